"""The command line end to end: `mtprl sft`, `mtprl train` (and resume), `mtprl eval`, bad input."""

import json
import os
import subprocess
import sys

import pytest

from mtprl.cli import COMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = ["--task", "reasoning_gym:chain_sum", "--task_config",
        '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}', "--train_size", "64",
        "--eval_size", "8", "--eval_k", "2", "--eval_max_new_tokens", "4"]
TINY = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--logging_steps", "1"]


def _rows(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# The round trip sft -> train -> resume -> train on -> eval -> probe -> report, one test per stage: each stage's
# input is a module-scoped fixture built by the stages before it, so a failure names the stage that broke.
def _main_printing(argv):
    """(main's return code, what it printed): for fixtures, which capsys (per test) cannot serve."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """The warm start: 3 SFT steps of the tiny preset (the expensive part every later stage builds on)."""
    sft = str(tmp_path_factory.mktemp("round_trip") / "sft")
    assert main(["sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.yaml"), *TASK, *TINY,
                 "--output_dir", sft, "--max_steps", "3", "--per_device_train_batch_size", "8"]) == 0
    return sft


def _train_args(sft):
    run = os.path.join(os.path.dirname(sft), "occ")
    return run, ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), *TASK, *TINY, "--model_name_or_path", sft,
                 "--output_dir", run, "--per_device_train_batch_size", "8", "--num_generations", "4",
                 "--steps_per_generation", "2", "--save_steps", "2"]


@pytest.fixture(scope="module")
def trained_run(sft_dir):
    """OCC trained 2 steps from the warm start, a checkpoint at step 2."""
    run, common = _train_args(sft_dir)
    assert main(["train", *common, "--max_steps", "2"]) == 0
    return run


@pytest.fixture(scope="module")
def resumed_run(trained_run, sft_dir):
    """The run resumed from checkpoint-2 to step 4."""
    run, common = _train_args(sft_dir)
    assert main(["train", *common, "--max_steps", "4", "--eval_before", "false",
                 "--resume_from_checkpoint", os.path.join(run, "checkpoint-2")]) == 0
    return run


@pytest.fixture(scope="module")
def extended_run(resumed_run, sft_dir):
    """The finished 4-step run asked for 6 steps: (run, what the call printed)."""
    run, common = _train_args(sft_dir)
    code, printed = _main_printing(["train", *common, "--max_steps", "6", "--eval_before", "false",
                                    "--resume_from_checkpoint", "true"])
    assert code == 0
    return run, printed


@pytest.fixture(scope="module")
def probed_run(extended_run):
    """The gain probe at checkpoint 4 of the 6-step run: (run, metrics.jsonl and eval.json as they were before)."""
    run, _ = extended_run
    log, evaluation = (open(os.path.join(run, name)).read() for name in ("metrics.jsonl", "eval.json"))
    assert main(["probe", "--run_dir", run, "--checkpoints", "4", "--prompts", "4", "--samples", "3",
                 "--lambdas", "0,1", "--direct", "1"]) == 0
    return run, log, evaluation


def test_sft_writes_heads_and_evaluates_them(sft_dir):
    assert os.path.isfile(os.path.join(sft_dir, "mtp_heads.safetensors"))
    sft_eval = json.load(open(os.path.join(sft_dir, "eval.json")))
    assert {"avg@2", "pass@2", "mtp/accept/1", "mtp/accept/2"} <= set(sft_eval)


def test_sft_again_with_the_model_in_place_trains_nothing(sft_dir, capsys):
    assert main(["sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.yaml"), *TASK, *TINY,
                 "--output_dir", sft_dir, "--max_steps", "3"]) == 0
    assert "skipping" in capsys.readouterr().out


def test_train_writes_checkpoints_with_heads(trained_run):
    assert os.path.isfile(os.path.join(trained_run, "checkpoint-2", "mtp_heads.safetensors"))


def test_resume_continues_the_log_and_evaluates(resumed_run):
    assert [r["step"] for r in _rows(resumed_run) if "mtp/lambda/1" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in _rows(resumed_run) if "train_loss" in r] == [4]  # the step-2 summary row went
    for name in ("eval_before.json", "eval.json"):
        assert "avg@2" in json.load(open(os.path.join(resumed_run, name)))


def test_finished_run_asked_for_more_steps_trains_on(extended_run):
    """TRL's behaviour: a finished run given a larger max_steps trains on, keeping the earlier evaluation."""
    run, printed = extended_run
    assert "resuming" in printed
    assert [r["step"] for r in _rows(run) if "mtp/lambda/1" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _rows(run) if "train_loss" in r] == [6]
    assert os.path.isfile(os.path.join(run, "eval-step4.json")) and os.path.isfile(os.path.join(run, "eval.json"))
    assert json.load(open(os.path.join(run, "run_info.json")))["trained_steps"] == 6


def test_finished_run_is_not_run_again(extended_run, sft_dir, capsys):
    _, common = _train_args(sft_dir)
    assert main(["train", *common, "--max_steps", "6", "--resume_from_checkpoint", "true"]) == 0
    assert "not running it again" in capsys.readouterr().out


def test_eval_of_a_run_into_a_file_and_with_the_runs_own_task(extended_run, tmp_path):
    run, _ = extended_run
    out = str(tmp_path / "again.json")
    assert main(["eval", *TASK, "--model_name_or_path", run, "--eval_output", out]) == 0
    assert json.load(open(out))["num_questions"] == 8
    # eval of a run: the run's own task settings (its 1-digit sums, not the task's built-in config) into a file of
    # its own; the training's eval.json stays as it was.
    before = open(os.path.join(run, "eval.json")).read()
    assert main(["eval", "--model_name_or_path", run, "--eval_size", "8", "--eval_k", "2"]) == 0
    assert open(os.path.join(run, "eval.json")).read() == before
    (own,) = os.listdir(os.path.join(run, "evals"))
    again = json.load(open(os.path.join(run, "evals", own)))
    assert again["questions_digest"] == json.loads(before)["questions_digest"]


def test_probe_at_a_checkpoint_leaves_the_runs_record_alone(probed_run):
    """The grid holds 0, OCC's lambda and the exact lambda; the run's own metrics.jsonl and eval.json are untouched."""
    run, log, evaluation = probed_run
    probe = json.load(open(os.path.join(run, "probes", "probe-step4.json")))
    grid = probe["lambdas"]
    assert {0.0, 1.0, probe["occ_lambda"], probe["exact_lambda"]} == set(grid) and grid == sorted(grid)
    assert probe["term"] == "policy" and probe["regime"] == "occ" and probe["v2_exact"] > 0
    for i in range(len(grid)):
        assert probe["dJ_low"][i] <= probe["dJ"][i] <= probe["dJ_high"][i]
    assert probe["dJ_rel"][grid.index(0.0)] == 0.0 and len(probe["direct"]) == 1
    assert open(os.path.join(run, "metrics.jsonl")).read() == log
    assert open(os.path.join(run, "eval.json")).read() == evaluation


def test_report_of_a_probed_run_shows_the_measured_figure_3(probed_run, tmp_path):
    run, _, _ = probed_run
    assert main(["report", run, "--report_dir", str(tmp_path / "rep")]) == 0
    assert "Why a regime wins, measured" in open(tmp_path / "rep" / "report.md").read()
    assert os.path.isfile(tmp_path / "rep" / "figure3_measured.png")


def test_probe_of_a_missing_checkpoint_names_it(extended_run, capsys):
    run, _ = extended_run
    assert main(["probe", "--run_dir", run, "--checkpoints", "3"]) == 1
    assert "step(s) [3]" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *TASK, *TINY, "--output_dir", str(tmp_path), "--mtp_regime", "joint"]) == 1
    assert "mtp_regime" in capsys.readouterr().err
    assert main(["train", *TINY, "--output_dir", str(tmp_path), "--task", f"jsonl:{tmp_path}/missing.jsonl"]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["eval", *TASK, "--model_name_or_path", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert main(["bogus"]) == 2


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "mtprl")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "sft" in out and "train" in out and "eval" in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    """argparse %-formats each field's help: an unescaped `%` in one help string made `compare --help` crash."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "--" in capsys.readouterr().out


@pytest.mark.slow
def test_make_train_flow(tmp_path):
    """The README's main job at full size (about 10 minutes): SFT, then OCC training, eval before/after."""
    sft, run = str(tmp_path / "sft"), str(tmp_path / "occ")
    assert main(["sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.yaml"), "--output_dir", sft]) == 0
    acc = json.load(open(os.path.join(sft, "eval.json")))["avg@8"]
    assert 0.15 <= acc <= 0.85
    assert main(["train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--model_name_or_path", sft,
                 "--output_dir", run]) == 0
    lambdas = [r["mtp/lambda/1"] for r in _rows(run) if "mtp/lambda/1" in r]
    assert any(abs(x) > 0 for x in lambdas)


def test_any_hf_causal_lm_directory_gets_fresh_heads(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mtprl.model.loading import char_tokenizer, load_model

    tok = char_tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    model, loaded_tok = load_model(str(tmp_path / "llama"), num_heads=3)
    assert model.mtp_heads.num_heads == 3 and type(model.mtp_heads.layers[0].mtp_block).__name__ == "LlamaDecoderLayer"
    assert loaded_tok.decode(loaded_tok("1 + 2 =")["input_ids"]) == "1 + 2 ="
    # A hub id is passed to from_pretrained, never refused; offline, transformers' error plus a line naming it.
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(OSError, match="mtprl: could not load model 'Qwen/Qwen2.5-Math-1.5B'"):
            load_model("Qwen/Qwen2.5-Math-1.5B")


def _bootstrap_by_hand(arm, base, resamples=4000, seed=0):
    """mtprl.core.stats' documented protocol, vectorised differently: draw all seed and question indices first."""
    import numpy as np

    diff = np.asarray(arm) - np.asarray(base)
    rng = np.random.default_rng(seed)
    n_s, n_q = diff.shape
    means = []
    for _ in range(resamples):
        s = rng.integers(0, n_s, n_s)
        q = rng.integers(0, n_q, n_q)
        means.append(diff[s][:, q].mean())
    return diff.mean(), np.quantile(means, 0.025), np.quantile(means, 0.975)


def test_compare_runs_each_arm_and_seed_once_and_reports(tmp_path, capsys):
    sft = str(tmp_path / "sft")
    assert main(["sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.yaml"), *TASK, *TINY,
                 "--output_dir", sft, "--max_steps", "2", "--per_device_train_batch_size", "8",
                 "--eval_after", "false"]) == 0
    report_dir = str(tmp_path / "cmp")
    args = ["compare", "--config", os.path.join(ROOT, "configs", "demo.yaml"), *TASK, *TINY,
            "--model_name_or_path", sft, "--arms", "detach,occ@occ_lambda_plus=0.5", "--seeds", "0,1",
            "--report_dir", report_dir, "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--num_generations", "4", "--steps_per_generation", "2", "--occ_fidelity_every", "1", "--save_steps", "1",
            "--eval_steps", "1", "--eval_size", "24"]
    assert main(args) == 0
    occ = "occ_occ_lambda_plus=0.5"  # the arm's run directory name
    runs = {name: os.path.join(report_dir, "runs", name)
            for name in ("detach-s0", "detach-s1", f"{occ}-s0", f"{occ}-s1")}
    runs["occ-s0"], runs["occ-s1"] = runs.pop(f"{occ}-s0"), runs.pop(f"{occ}-s1")
    text = open(os.path.join(report_dir, "report.md")).read()
    from mtprl.analysis.report import mean_std

    evals = {}
    for regime, label in (("detach", "Detach"), ("occ", "occ@occ_lambda_plus=0.5")):
        evals[regime] = [json.load(open(os.path.join(runs[f"{regime}-s{s}"], "eval.json"))) for s in (0, 1)]
        assert json.load(open(os.path.join(runs[f"{regime}-s0"], "run_info.json")))["label"] in (regime, label)
        mean, std = mean_std([e["avg@2"] for e in evals[regime]])
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert f"{100 * mean:.1f} ± {100 * std:.1f}" in row
        rewards = [[r["reward"] for r in _rows(runs[f"{regime}-s{s}"]) if "reward" in r] for s in (0, 1)]
        rmean, rstd = mean_std([sum(r[-5:]) / len(r[-5:]) for r in rewards])
        assert f"{100 * rmean:.1f} ± {100 * rstd:.1f}" in row
    # periodic evaluation at step 1 (the last step's point is eval.json), in every run
    for path in runs.values():
        assert [r["step"] for r in _rows(path) if "eval/avg@2" in r] == [1]
    # the paired interval of occ - detach, against the documented bootstrap protocol on the runs' own files
    acc = {r: [[c / 2 for c in e["correct_per_question"]] for e in evals[r]] for r in evals}
    mean, low, high = _bootstrap_by_hand(acc["occ"], acc["detach"])
    report = json.load(open(os.path.join(report_dir, "report.json")))
    got = next(r for r in report["rows"] if r["label"] == "occ@occ_lambda_plus=0.5")["vs_baseline"]
    assert (got["mean"], got["low"], got["high"]) == pytest.approx((mean, low, high), abs=1e-12)
    assert got["verdict"] in ("better", "worse", "no detectable difference")
    assert report["baseline"] == "detach" and os.path.isfile(os.path.join(report_dir, "start", "eval.json"))
    for png in ("estimators_vs_exact.png", "accuracy_over_steps.png", "reward.png", "abs_lambda.png"):
        assert os.path.isfile(os.path.join(report_dir, png)), png
    capsys.readouterr()
    # Again: every run is finished, nothing is trained.
    mtimes = {n: os.path.getmtime(os.path.join(p, "eval.json")) for n, p in runs.items()}
    assert main(args) == 0
    assert capsys.readouterr().out.count("not running it again") == 4
    # A deleted run is run again; an interrupted one (checkpoint, no eval.json) resumes from its checkpoint.
    import shutil

    shutil.rmtree(runs["occ-s1"])
    os.remove(os.path.join(runs["detach-s1"], "eval.json"))  # killed during its evaluation
    for name in ("model.safetensors", "mtp_heads.safetensors", "eval.json"):  # killed after step 1
        os.remove(os.path.join(runs["occ-s0"], name))
    shutil.rmtree(os.path.join(runs["occ-s0"], "checkpoint-2"))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "running arm occ@occ_lambda_plus=0.5 seed 1" in out and "resuming" in out
    assert "finished training; evaluating" in out
    assert out.count("not running it again") == 1
    assert os.path.getmtime(os.path.join(runs["detach-s0"], "eval.json")) == mtimes["detach-s0"]
    assert [r["step"] for r in _rows(runs["detach-s1"]) if "mtp/lambda/1" in r] == [1, 2]
    assert [r["step"] for r in _rows(runs["occ-s0"]) if "mtp/lambda/1" in r] == [1, 2]
    assert [r["step"] for r in _rows(runs["occ-s0"]) if "eval/avg@2" in r] == [1]  # resumed: not twice
    assert all(os.path.isfile(os.path.join(p, "eval.json")) for p in runs.values())


def test_run_state_on_crafted_run_directories(tmp_path):
    """finished / evaluate / resume / fresh, decided from the files a run leaves behind."""
    from mtprl.training.runs import run_state

    run = tmp_path / "run"
    assert run_state(str(run), max_steps=4).kind == "fresh"
    for step in (2, 4):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "model.safetensors").write_text("")
        (run / f"checkpoint-{step}" / "mtp_heads.safetensors").write_text("")
    (run / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    state = run_state(str(run), max_steps=6)
    assert (state.kind, state.checkpoint, state.step) == ("resume", str(run / "checkpoint-4"), 4)
    state = run_state(str(run), max_steps=4)  # trained to the end, killed before the final save
    assert (state.kind, state.checkpoint) == ("evaluate", str(run / "checkpoint-4"))
    (run / "checkpoint-4" / "trainer_state.json").unlink()  # a checkpoint being written is not one
    assert run_state(str(run), max_steps=4).step == 2
    (run / "model.safetensors").write_text("")
    (run / "mtp_heads.safetensors").write_text("")
    state = run_state(str(run), max_steps=4)  # final model saved, killed during the evaluation
    assert (state.kind, state.checkpoint) == ("evaluate", None)
    (run / "eval.json").write_text("{}")
    assert run_state(str(run), max_steps=4).kind == "finished"


def test_compare_arguments_are_checked():
    from mtprl.cli import CompareArguments

    assert CompareArguments(regimes="detach, occ", seeds="0,2").regime_list() == ["detach", "occ"]
    assert CompareArguments(seeds="0,2").seed_list() == [0, 2]
    with pytest.raises(ValueError, match="unknown regime 'joint'"):
        CompareArguments(regimes="detach,joint").regime_list()
    with pytest.raises(ValueError, match="--seeds"):
        CompareArguments(seeds="0,x").seed_list()
    assert main(["compare", "--regimes", "detach,joint", "--report_dir", "/tmp/never"]) == 1
    assert main(["compare", "--arms", "detach,occ@occ_lambda=2", "--report_dir", "/tmp/never"]) == 1
    from mtprl.analysis.compare import baseline_arm

    arms = CompareArguments(arms="ce,detach,occ").arm_list()
    assert baseline_arm(arms).label == "detach" and baseline_arm(arms, "occ").label == "occ"
    with pytest.raises(ValueError, match="--baseline 'ce' is not one of the arms"):
        baseline_arm(CompareArguments(arms="detach,occ").arm_list(), "ce")


def test_eval_datasets_give_per_benchmark_columns_and_their_average(tmp_path):
    bench = tmp_path / "gsm8k_test.jsonl"
    bench.write_text("".join(json.dumps({"question": f"{a}+{a}=", "answer": f"so\n#### {2 * a}"}) + "\n"
                             for a in range(1, 4)))
    out = str(tmp_path / "eval.json")
    specs = json.dumps({"gsm": {"path": str(bench), "split": "test"}, "gsm2": {"path": str(bench), "size": 2}})
    assert main(["eval", *TASK, "--model_name_or_path", "tiny", "--eval_output", out, "--eval_datasets", specs]) == 0
    result = json.load(open(out))
    assert result["benchmarks"]["gsm"]["num_questions"] == 3 and result["benchmarks"]["gsm2"]["num_questions"] == 2
    for key in ("avg@2", "pass@2"):
        expected = (result["benchmarks"]["gsm"][key] + result["benchmarks"]["gsm2"][key]) / 2
        assert result["benchmarks_average"][key] == pytest.approx(expected)
    assert main(["eval", *TASK, "--model_name_or_path", "tiny", "--eval_output", out,
                 "--eval_datasets", '{"x": {"split": "test"}}']) == 1


@pytest.mark.parametrize("table", [1, 2, 3, 4])
def test_paper_configs_parse_and_run_one_step_per_arm(tmp_path, table):
    """configs/paper/tableN.yaml as a user runs it, shrunk to 1 step per arm and one seed on the tiny preset."""
    import yaml

    path = os.path.join(ROOT, "configs", "paper", f"table{table}.yaml")
    arms = yaml.safe_load(open(path))["arms"]
    report_dir = str(tmp_path / "report")
    assert main(["compare", "--config", path, *TASK, *TINY, "--model_name_or_path", "tiny", "--seeds", "0",
                 "--report_dir", report_dir, "--max_steps", "1", "--eval_steps", "0", "--save_strategy", "no",
                 "--per_device_train_batch_size", "8", "--num_generations", "4", "--steps_per_generation", "2"]) == 0
    report = json.load(open(os.path.join(report_dir, "report.json")))
    assert len(report["rows"]) == len(arms) and report["baseline"] == "detach"
    for row in report["rows"]:
        assert row["label"] == "detach" or row["vs_baseline"] is not None, row["label"]


def test_sft_answer_suffix_fraction_writes_that_share_of_completions_in_the_rejected_format():
    from datasets import Dataset

    from mtprl.data.sft_data import sft_completions
    from mtprl.data.scoring import TaskReward
    from mtprl.training.config import MTPSFTConfig

    rows = Dataset.from_list([{"prompt": f"{i}+1=", "answer": str(i + 1), "x": 0} for i in range(400)])
    out = sft_completions(rows, 0.5, seed=0)
    assert out.column_names == ["prompt", "completion"]
    suffixed = [c.endswith("!") for c in out["completion"]]
    assert 160 < sum(suffixed) < 240  # a seeded half
    assert [c.rstrip("!") for c in out["completion"]] == rows["answer"]
    assert sft_completions(rows, 0.5, seed=0)["completion"] == out["completion"]
    assert not any(c.endswith("!") for c in sft_completions(rows, 0.0, seed=0)["completion"])
    reward = TaskReward()  # the verifier gives the suffixed format partial credit only: avg@k counts it wrong
    assert reward.score("12", "12", "reasoning_gym:chain_sum") == 1.0
    assert 0 < reward.score("12!", "12", "reasoning_gym:chain_sum") < 1.0
    with pytest.raises(ValueError, match="answer_suffix_fraction"):
        MTPSFTConfig(output_dir="x", answer_suffix_fraction=1.5)


def test_compare_evaluates_the_start_again_when_the_starting_model_changed(tmp_path, capsys):
    """start/eval.json is step 0 of every curve and the reference of every 'avg@k - start': kept while the
    starting model is the same, evaluated again when it was rewritten (e.g. a new warm start)."""
    import mtprl
    from mtprl.analysis.compare import evaluate_start
    from mtprl.data.task_setup import TaskArguments
    from mtprl.training.runs import start_fingerprint
    from mtprl.model.loading import load_model
    from mtprl.training.trainer import MTPGRPOConfig

    model, tok = load_model("tiny")
    start = str(tmp_path / "start-model")
    mtprl.save_pretrained(model, start, tok)
    task_args = TaskArguments(model_name_or_path=start, eval_size=8, eval_k=1, eval_max_new_tokens=4)
    cfg = MTPGRPOConfig(output_dir=str(tmp_path / "o"), mtp_num_heads=1, use_cpu=True, report_to=[])
    path = tmp_path / "cmp" / "start" / "eval.json"
    evaluate_start(task_args, cfg, str(tmp_path / "cmp"))
    first = json.load(open(path))
    assert first["start_model"] == start_fingerprint(start) and "avg@1" in first
    mtime = os.path.getmtime(path)
    evaluate_start(task_args, cfg, str(tmp_path / "cmp"))  # same model: kept
    assert os.path.getmtime(path) == mtime
    capsys.readouterr()
    mtprl.save_pretrained(load_model("tiny", seed=1)[0], start, tok)  # a new warm start in the same place
    evaluate_start(task_args, cfg, str(tmp_path / "cmp"))
    assert "evaluating it again" in capsys.readouterr().out
    assert json.load(open(path))["start_model"] == start_fingerprint(start) != first["start_model"]


def test_compare_refuses_to_keep_a_run_made_from_another_starting_model(tmp_path):
    import mtprl
    from mtprl.training.runs import check_same_start, start_fingerprint
    from mtprl.model.loading import load_model

    model, tok = load_model("tiny")
    start = str(tmp_path / "start-model")
    mtprl.save_pretrained(model, start, tok)
    run = tmp_path / "runs" / "detach-s0"
    run.mkdir(parents=True)
    (run / "run_info.json").write_text(json.dumps({"start_model": start_fingerprint(start)}))
    check_same_start(str(run), start)  # same start: kept
    mtprl.save_pretrained(load_model("tiny", seed=1)[0], start, tok)
    with pytest.raises(ValueError, match="detach-s0 was trained from another starting model"):
        check_same_start(str(run), start)
    (run / "run_info.json").write_text(json.dumps({"label": "detach"}))  # written before fingerprints: kept
    check_same_start(str(run), start)


def test_eval_and_mtp_only_sampling_take_the_draft_options(tmp_path):
    """`mtprl eval --mtp_draft_tokens` samples through the heads (rollout metrics in eval.json); a draft count over
    the model's heads is a clear error; `sft --mtp_only` self-samples through the heads too."""
    out = str(tmp_path / "eval.json")
    assert main(["eval", *TASK, "--model_name_or_path", "tiny", "--eval_output", out, "--mtp_draft_tokens", "1",
                 "--mtp_draft_policy", "fixed"]) == 0
    result = json.load(open(out))
    assert result["rollout/draft_tokens"] == 1.0 and result["rollout/spec_accept_length"] >= 1.0
    assert {"avg@2", "pass@2", "rollout/spec_accept_rate/1", "rollout/tokens_per_s"} <= set(result)
    assert main(["eval", *TASK, "--model_name_or_path", "tiny", "--eval_output", out, "--mtp_draft_tokens", "3"]) == 1
    assert main(["eval", *TASK, "--model_name_or_path", "tiny", "--eval_output", out, "--mtp_draft_tokens", "1",
                 "--mtp_draft_vocab_size", "8"]) == 0
    assert json.load(open(out))["rollout/draft_vocab_size"] == 8.0
    sft = str(tmp_path / "heads")
    assert main(["sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.yaml"), *TASK, *TINY, "--output_dir", sft,
                 "--max_steps", "2", "--mtp_only", "true", "--mtp_only_max_new_tokens", "4", "--mtp_draft_tokens", "2",
                 "--per_device_train_batch_size", "8", "--eval_after", "false"]) == 0
    assert os.path.isfile(os.path.join(sft, "mtp_heads.safetensors"))


def test_a_mistyped_local_path_fails_at_once_and_hub_ids_are_not_refused(tmp_path, monkeypatch):
    import time

    from mtprl.model.loading import check_local_path, looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    start = time.time()
    with pytest.raises(OSError, match="no such directory"):
        check_local_path("runs/does-not-exist")
    assert time.time() - start < 1.0
    assert main(["eval", "--model_name_or_path", "runs/does-not-exist"]) == 1
    for hub_id in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"):
        assert not looks_local(hub_id)
        check_local_path(hub_id)  # never refused here: from_pretrained decides
    assert looks_local("./model") and looks_local("/abs/model") and looks_local("a/b/c")


def test_temperature_zero_is_refused_at_construction(tmp_path):
    from mtprl import MTPGRPOConfig

    with pytest.raises(ValueError, match="temperature must be a finite number in \\(0"):
        MTPGRPOConfig(output_dir=str(tmp_path), temperature=0.0, use_cpu=True, report_to=[])


def test_an_unknown_yaml_key_names_the_file_and_the_closest_field(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("occ_lamda_plus: 2.0\nmax_steps: 1\n")
    assert main(["train", "--config", str(config), *TINY]) == 1
    err = capsys.readouterr().err
    assert f"{config}: unknown field 'occ_lamda_plus' (did you mean occ_lambda_plus?)" in err


def test_report_to_an_integration_that_is_not_installed_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", *TINY[:4], "--report_to", "tensorboard", "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "mtprl train: error: report_to: tensorboard is not installed here (pip install it, or set " \
                      "report_to none)"


def test_sft_mtp_only_resumes_from_its_last_checkpoint_without_resampling(tmp_path):
    """A warm-up killed after checkpoint-2: `--resume_from_checkpoint true` continues from it to max_steps, on the
    self-sampled text kept in the run directory (not sampled again)."""
    sft = tmp_path / "heads"
    common = ["sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.yaml"), *TASK, *TINY, "--output_dir",
              str(sft), "--mtp_only", "true", "--mtp_only_max_new_tokens", "4", "--per_device_train_batch_size", "8",
              "--eval_after", "false", "--save_strategy", "steps", "--save_steps", "2"]
    assert main(common + ["--max_steps", "2"]) == 0
    data = sft / "self_distillation.jsonl"
    kept = data.read_text()
    assert kept.count("\n") > 0 and (sft / "checkpoint-2" / "trainer_state.json").is_file()
    for name in os.listdir(sft):  # the kill: no final model, only the checkpoint
        if name.endswith(".safetensors"):
            os.remove(sft / name)
    os.utime(data, (0, 0))
    assert main(common + ["--max_steps", "4", "--resume_from_checkpoint", "true"]) == 0
    assert data.read_text() == kept and os.stat(data).st_mtime == 0  # reused, not rewritten
    state = json.load(open(sft / "checkpoint-4" / "trainer_state.json"))
    assert state["global_step"] == 4 and os.path.isfile(sft / "mtp_heads.safetensors")
    steps = [json.loads(line)["step"] for line in open(sft / "metrics.jsonl") if '"loss"' in line]
    assert steps == sorted(set(steps))  # each step logged once across the resume


def test_a_missing_path_in_hub_id_form_says_the_path_does_not_exist(tmp_path, monkeypatch):
    """'runs/x' on a fresh clone (no runs/ directory) reads as a hub id 'org/name'; offline, the error says that
    the path does not exist here as well as that the hub could not be reached."""
    from mtprl.model.loading import load_base_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="the path 'runs/does-not-exist-here' does not exist here"):
        load_base_model("runs/does-not-exist-here")
