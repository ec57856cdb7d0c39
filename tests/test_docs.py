"""The manual against the code: the committed configuration reference is the generated one, and the command-line
help is built from the code's own tables, mtprl's fields first."""

import importlib.util
import os
import re

from mtprl import cli
from mtprl.training.config import MTPGRPOConfig
from mtprl.data.task_setup import TaskArguments
from mtprl.model.native import LAYOUT_BY_NAME
from mtprl.core.regimes import OCC_VARIANTS, REGIMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_module():
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  os.path.join(ROOT, "scripts", "config_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_configuration_reference_is_current_and_a_stale_one_is_caught():
    ref = _reference_module()
    with open(ref.REFERENCE) as f:
        committed = f.read()
    assert ref.stale_tables(committed) == [], "run: python scripts/config_reference.py"
    # every field mtprl adds to GRPOConfig has its row, with its help text
    for name in ("occ_lambda_plus", "mtp_head_loss", "reward_failure", "mtp_draft_tokens"):
        assert f"| `{name}` |" in committed
    # a stale file (a help text edited in the code but not regenerated) is reported, naming the table
    stale = committed.replace("lambda_plus of Eq. 13", "lambda_plus of Eq. 12", 1)
    assert stale != committed and ref.stale_tables(stale) == ["mtprl.training.config.MTPGRPOConfig"]
    assert ref.render(stale) == committed


def test_top_level_help_lists_the_regimes_variants_and_layouts_from_the_tables(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "|".join(REGIMES) in text and "|".join(OCC_VARIANTS) in text
    for layout in LAYOUT_BY_NAME:
        assert layout in text
    assert "|".join(cli.EXPORT_FORMATS) in text


def test_train_help_shows_mtprls_fields_first_under_their_own_heading():
    parser = cli.Parser((TaskArguments, MTPGRPOConfig), "train")
    text = parser.format_help()
    assert text.startswith("usage: mtprl train [--config FILE.yaml]")
    headings = re.findall(r"^(\S.*):$", text, flags=re.M)
    assert headings[0] == "options" and headings[1].startswith("mtprl: heads, regime, OCC")
    assert headings[-1].startswith("GRPOConfig (trl")
    own = [f.name for f in MTPGRPOConfig.__dataclass_fields__.values()
           if f.name not in __import__("trl").GRPOConfig.__dataclass_fields__]
    first_trl = text.index("--learning_rate")
    for name in own:  # every field mtprl adds comes before TRL's
        assert text.index(f"--{name} ") < first_trl, name
    # the grouping changes nothing in what is parsed
    _, cfg = parser.parse_args_and_config(["--output_dir", "x", "--use_cpu", "true", "--bf16", "false", "--mtp_regime", "ce",
                                         "--learning_rate", "0.5"])
    assert cfg.mtp_regime == "ce" and cfg.learning_rate == 0.5


# What `test_docs_name_only_code_that_exists` does not resolve: names from other libraries and instances (by their first
# part), files (by their ending), and names of data rather than code (a dataset column, a checkpoint tensor's).
NOT_MTPRL = {"trl", "transformers", "torch", "accelerate", "datasets", "scipy", "GRPOTrainer", "GRPOConfig",
             "AutoModelForCausalLM", "MtpModel", "DistributedType", "model", "ref_model", "reward_model", "shared_head"}
FILE_ENDINGS = {"py", "yaml", "json", "jsonl", "md", "png", "toml", "bin", "safetensors"}
INSTANCE_NAMES = {"trainer.train"}  # a trainer's `train` (MTPGRPOTrainer.train), not the module mtprl.training.trainer


def _doc_code_names():
    """{dotted name in backticks: the docs naming it}, from README.md and docs/; `name(...)` counts as `name`."""
    import glob

    found = {}
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                      recursive=True))]:
        with open(path) as f:
            for span in re.findall(r"`([^`\n]+)`", f.read()):
                m = re.match(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\(.*\))?$", span)
                if m:
                    found.setdefault(m.group(1), set()).add(os.path.relpath(path, ROOT))
    return found


def _mtprl_classes():
    """{public class name: class} over every mtprl module that imports here (docs name a class by itself)."""
    import importlib
    import inspect
    import pkgutil

    import mtprl

    classes = {}
    for info in pkgutil.walk_packages(mtprl.__path__, "mtprl."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        for name, value in vars(module).items():
            if inspect.isclass(value) and not name.startswith("_") and value.__module__ == module.__name__:
                classes.setdefault(name, value)
    return classes


def _module_named(name: str):
    """The mtprl module `mtprl.<subpackage>.<name>`, or None."""
    import importlib
    import pkgutil

    import mtprl

    for info in pkgutil.iter_modules(mtprl.__path__):
        if info.ispkg and importlib.util.find_spec(f"mtprl.{info.name}.{name}") is not None:
            return importlib.import_module(f"mtprl.{info.name}.{name}")
    return None


def _resolves(name: str, classes: dict) -> bool:
    import importlib

    import mtprl

    first, *rest = name.split(".")
    if first == "mtprl":
        obj, rest = mtprl, rest
    elif importlib.util.find_spec(f"mtprl.{first}") is not None:
        obj = importlib.import_module(f"mtprl.{first}")
    elif _module_named(first):  # a module by its own name (`mtp_step.mtp_step`), in whichever subpackage holds it
        obj = _module_named(first)
    elif not first.startswith("_") and hasattr(mtprl, first):
        obj = getattr(mtprl, first)
    elif first in classes:
        obj = classes[first]
    else:
        return False
    for i, part in enumerate(rest):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif hasattr(obj, "__path__") and importlib.util.find_spec(f"{obj.__name__}.{part}") is not None:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        elif i == len(rest) - 1 and part in {**getattr(obj, "__dataclass_fields__", {}),
                                                **getattr(obj, "__annotations__", {})}:
            return True  # a field without a class-level default
        else:
            return False
    return True


def test_docs_name_only_code_that_exists():
    names = _doc_code_names()
    assert "occ.lambda_from_stats" in names and "regimes.MTP_TERMS" in names  # the scan sees the layout page
    classes = _mtprl_classes()
    checked = {name: docs for name, docs in names.items()
               if name.split(".")[0] not in NOT_MTPRL and name.rsplit(".", 1)[-1] not in FILE_ENDINGS
               and name not in INSTANCE_NAMES}
    missing = sorted(f"`{name}` ({', '.join(sorted(docs))})" for name, docs in checked.items()
                     if not _resolves(name, classes))
    assert not missing, "the docs name code that does not exist:\n  " + "\n  ".join(missing)
    assert not _resolves("occ.lambda_from_stats_typo", classes) and not _resolves("nomodule.x", classes)


def test_the_package_map_names_every_module():
    """docs/layout.md is the one package map: every module under src/mtprl has its row there."""
    src = os.path.join(ROOT, "src", "mtprl")
    modules = sorted(os.path.relpath(os.path.join(d, name), src) for d, _, names in os.walk(src) for name in names
                     if name.endswith(".py") and name != "__init__.py")
    text = open(os.path.join(ROOT, "docs", "layout.md")).read()
    missing = [m for m in modules if f"`src/mtprl/{m}`" not in text]
    assert not missing, f"docs/layout.md has no row for {missing}"
