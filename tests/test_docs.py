"""The manual against the code: the committed configuration reference is the generated one, and the command-line
help is built from the code's own tables, mtprl's fields first."""

import importlib.util
import os
import re

from mtprl import cli
from mtprl.config import MTPGRPOConfig
from mtprl.native import LAYOUT_BY_NAME
from mtprl.regimes import OCC_VARIANTS, REGIMES

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
    assert stale != committed and ref.stale_tables(stale) == ["mtprl.config.MTPGRPOConfig"]
    assert ref.render(stale) == committed


def test_top_level_help_lists_the_regimes_variants_and_layouts_from_the_tables(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "|".join(REGIMES) in text and "|".join(OCC_VARIANTS) in text
    for layout in LAYOUT_BY_NAME:
        assert layout in text
    assert "|".join(cli.EXPORT_FORMATS) in text


def test_train_help_shows_mtprls_fields_first_under_their_own_heading():
    parser = cli.Parser((cli.TaskArguments, MTPGRPOConfig), "train")
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
