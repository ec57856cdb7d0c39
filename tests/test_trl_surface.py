"""The TRL / transformers surface mtprl relies on (`mtprl.trl_surface.SURFACE`) against the installed packages, the
trainer mtprl builds, and the table in docs/layout.md."""

import importlib
import inspect
import os
import re

import pytest

from mtprl import trl_surface
from mtprl.trl_surface import SURFACE, Use

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_name_mtprl_relies_on_still_exists():
    problems = trl_surface.messages()
    assert not problems, "\n".join(problems)


def test_a_name_that_does_not_exist_is_reported():
    fakes = (
        Use("trl.GRPOTrainer._no_such_method", "called", ("trainer.MTPGRPOTrainer._compute_loss",), "a fake entry"),
        Use("trl.GRPOTrainer.no_such_attribute", "read", ("trainer.MTPGRPOTrainer.loss_scaling",), "a fake one",
            "init"),
        Use("trl.no_such_module.thing", "called", ("update.UpdateMixin.draw_rollout",), "a fake one"),
        Use("trl.trainer.utils.split_tensor_dict(num_chunks, tensor_dict)", "called",
            ("update.UpdateMixin.draw_rollout",), "parameters in the wrong order"),
        Use("transformers.masking_utils.create_causal_mask(config, ..., no_such_keyword)", "called",
            ("mtp.MTPHeads.forward",), "a keyword that does not exist"),
    )
    real = SURFACE[0]
    assert trl_surface.missing_names((real, *fakes)) == [f.name for f in fakes]
    lines = trl_surface.messages(fakes)
    assert lines[0] == ("TRL changed: trl.GRPOTrainer._no_such_method no longer exists; mtprl uses it in "
                        "trainer.MTPGRPOTrainer._compute_loss for a fake entry")
    assert lines[1].startswith("TRL changed: trl.GRPOTrainer.no_such_attribute no longer exists")
    assert "split_tensor_dict takes (tensor_dict, num_chunks), mtprl relies on (num_chunks, tensor_dict)" in lines[3]
    assert lines[4].startswith("transformers changed: transformers.masking_utils.create_causal_mask takes (")


def test_a_private_name_trl_adds_under_mtprls_own_is_caught(monkeypatch):
    import sys
    import types

    from trl import GRPOTrainer

    assert trl_surface.unlisted_collisions() == [], "\n".join(trl_surface.unlisted_collisions())
    fake = types.ModuleType("mtprl.fake_for_test")  # mtprl's own classes are found by their module
    fake.__file__ = __file__  # where inspect finds the class's source
    monkeypatch.setitem(sys.modules, fake.__name__, fake)

    class Ours(GRPOTrainer):
        def _prepare_inputs(self, inputs):  # TRL's, listed
            return inputs

        def _log_metrics(self):  # ours only
            self.epsilon_low = 0.1  # TRL's attribute, listed
            self._metrics_seen, self._current_train_step_time = 1, 0.0  # ours only; TRL's, not listed

    Ours.__module__ = fake.__name__
    found = trl_surface.unlisted_collisions([Ours])
    assert len(found) == 1 and "GRPOTrainer now defines _current_train_step_time, which mtprl's Ours" in found[0]
    unlisted = [use for use in SURFACE if not use.name.startswith("trl.GRPOTrainer._prepare_inputs")]
    found = trl_surface.unlisted_collisions([Ours], unlisted)
    assert len(found) == 2 and "now defines _prepare_inputs, which mtprl's Ours also defines" in found[1]


def test_entries_are_well_formed_and_name_mtprl_code_that_exists():
    names = [use.dotted for use in SURFACE]
    assert len(names) == len(set(names)), "a name is listed twice"
    for use in SURFACE:
        assert use.name.split(".")[0] in ("trl", "transformers", "accelerate"), use.name
        assert all(k in trl_surface.KINDS for k in use.kind.split(", ")), f"{use.name}: kind {use.kind!r}"
        assert use.instance in ("", "init", "later"), use.name
        assert use.where and use.why and "|" not in use.why, use.name
        for where in use.where:
            parts = where.split(".")  # subpackage.module.attribute..., or cli.attribute...
            cut = 1 if parts[0] == "cli" else 2
            obj, attrs = importlib.import_module("mtprl." + ".".join(parts[:cut])), parts[cut:]
            for attr in attrs:
                assert hasattr(obj, attr), f"{use.name}: where {where!r} does not exist in mtprl"
                obj = getattr(obj, attr)


def test_instance_attributes_exist_on_a_real_trainer(tmp_path):
    """The `init` entries on the objects themselves (the source check of `missing_names` stands in for them where no
    object is built here: SFTTrainer, MtpModel)."""
    from conftest import _mtp_trainer
    from transformers import HfArgumentParser

    trainer = _mtp_trainer(tmp_path, mtp_regime="ce")
    model = trainer.accelerator.unwrap_model(trainer.model)
    objects = {"trl.GRPOTrainer": trainer, "transformers.Trainer": trainer,
               "transformers.PreTrainedConfig": model.config,
               "transformers.modeling_layers.MtpLayer": model.mtp_heads.layers[0],
               "transformers.models.qwen2.modeling_qwen2.Qwen2Model": model.get_decoder(),
               "transformers.HfArgumentParser": HfArgumentParser([])}
    checked, absent = 0, []
    for use in SURFACE:
        owner, attr = use.dotted.rsplit(".", 1)
        if use.instance == "init" and owner in objects:
            checked += 1
            if not hasattr(objects[owner], attr):
                absent.append(f"{use.name} (mtprl uses it in {', '.join(use.where)})")
    assert not absent, "not on the built object:\n  " + "\n  ".join(absent)
    assert checked >= 20
    # and mtprl's own copy of TRL's multimodal loss inputs is TRL's list (the ones the heads refuse)
    from mtprl.training.trainer import _MULTIMODAL_KEYS
    from trl import GRPOTrainer

    params = list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert set(params[params.index("compute_aux_loss") + 1:]) == set(_MULTIMODAL_KEYS)


def _docs_section() -> str:
    with open(os.path.join(ROOT, "docs", "layout.md")) as f:
        text = f.read()
    assert trl_surface.HEADING in text, f"docs/layout.md has no section {trl_surface.HEADING!r}"
    section = text.split(trl_surface.HEADING, 1)[1]
    return section.split("\n## ", 1)[0]


def _table_rows(section: str) -> list[list[str]]:
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]  # after header and rule


def test_docs_table_lists_the_same_names_as_the_code():
    documented = [re.fullmatch(r"`([^`]+)`", row[0]).group(1) for row in _table_rows(_docs_section())]
    coded = [use.name for use in SURFACE]
    only_docs = sorted(set(documented) - set(coded))
    only_code = sorted(set(coded) - set(documented))
    assert not only_docs and not only_code, (
        f"docs/layout.md's table and mtprl.trl_surface.SURFACE differ: only in the docs {only_docs}, only in the code "
        f"{only_code} (print the table with `python -m mtprl.trl_surface --markdown`)")


def test_docs_table_is_the_one_the_code_prints():
    rows = _table_rows(_docs_section())
    expected = [[cell.strip() for cell in row.strip("|").split("|")] for row in trl_surface.markdown_rows()[2:]]
    differing = [f"docs: {r}\ncode: {e}" for r, e in zip(rows, expected) if r != e]
    assert len(rows) == len(expected) and not differing, (
        "docs/layout.md's table is not `python -m mtprl.trl_surface --markdown`:\n" + "\n".join(differing))


@pytest.mark.parametrize("argv", [[], ["--markdown"]])
def test_the_command_line(argv, capsys):
    assert trl_surface.main(argv) == 0
    out = capsys.readouterr().out
    assert (out == trl_surface.markdown_section()) if argv else out.startswith(f"all {len(SURFACE)} names")
