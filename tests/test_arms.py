"""Arms (a regime plus field overrides) and the paired bootstrap behind the report's intervals."""

from dataclasses import fields

import numpy as np
import pytest

from mtprl.analysis.arms import parse_arms
from mtprl.core.stats import question_seed_bootstrap, verdict
from mtprl.training.trainer import MTPGRPOConfig

FIELDS = {f.name for f in fields(MTPGRPOConfig)}


def test_arms_from_the_command_line_string():
    arms = parse_arms("detach, ce,policy@mtp_coef=0.5,occ@occ_lambda_plus=2.0@occ_clip=true", FIELDS)
    assert [a.regime for a in arms] == ["detach", "ce", "policy", "occ"]
    assert arms[2].overrides == {"mtp_coef": "0.5"} and arms[2].label == "policy@mtp_coef=0.5"
    assert arms[3].cli_args() == ["--mtp_regime", "occ", "--occ_lambda_plus", "2.0", "--occ_clip", "true"]
    assert arms[0].cli_args() == ["--mtp_regime", "detach"] and arms[3].slug == "occ_occ_lambda_plus=2.0_occ_clip=true"


def test_arms_from_a_yaml_list_with_labels():
    arms = parse_arms(["detach", {"label": "Policy 0.5", "regime": "policy", "mtp_coef": 0.5},
                       {"regime": "occ", "occ_clip": True}], FIELDS)
    assert [a.label for a in arms] == ["detach", "Policy 0.5", "occ@occ_clip=True"]
    assert arms[1].slug == "Policy_0.5" and arms[2].cli_args()[-2:] == ["--occ_clip", "true"]


@pytest.mark.parametrize("spec,message", [
    ("detach,joint@mtp_coef=1", "arm 'joint@mtp_coef=1': unknown regime 'joint'"),
    ("detach,occ@occ_lambda=2", "arm 'occ@occ_lambda=2': unknown or not overridable field 'occ_lambda'"),
    ("occ@seed=3", "arm 'occ@seed=3': 'seed' is set by compare itself"),
    ("occ@model_name_or_path=x", "arm 'occ@model_name_or_path=x': unknown or not overridable field"),
    ("policy@mtp_coef", "arm 'policy@mtp_coef': override 'mtp_coef' is not field=value"),
    ([{"label": "a"}], r"arms\[0\]"),
    ([{"label": "x y", "regime": "ce"}, {"label": "x_y", "regime": "policy"}], "share the run directory name"),
    ("", "no arm given"),
])
def test_bad_arms_are_errors_naming_the_arm(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_arms(spec, FIELDS)


def test_old_seed_and_question_bootstrap_verdicts_and_shapes():
    """The old interval, kept for the A/A calibration's comparison (tests/test_verdicts.py shows it fails there)."""
    rng = np.random.default_rng(3)
    base = rng.random((2, 300))
    better = question_seed_bootstrap(np.clip(base + 0.1, 0, 1), base)
    assert better.verdict == "better" and better.low > 0 and better.seeds == 2 and better.questions == 300
    assert question_seed_bootstrap(base - 0.1, base).verdict == "worse"
    noise = question_seed_bootstrap(base + 0.02 * rng.standard_normal(base.shape), base)
    assert noise.low < 0 < noise.high and noise.verdict == "no detectable difference"
    assert question_seed_bootstrap(base, base)[:3] == (0.0, 0.0, 0.0)
    assert verdict(-0.1, 0.2) == "no detectable difference"
    with pytest.raises(ValueError, match="one shape"):
        question_seed_bootstrap(base, base[:, :10])
