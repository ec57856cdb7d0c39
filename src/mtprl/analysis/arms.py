"""Arms of a comparison: a regime plus field overrides, e.g. `policy@mtp_coef=0.5` or `occ@occ_clip=true`.

On the command line: `--arms detach,ce,policy@mtp_coef=0.5,occ@occ_lambda_plus=2.0@occ_clip=true` (several
overrides chained with `@`). In a YAML config, `arms:` is a list whose items are such strings or mappings with a
`regime`, an optional `label` and the overrides as keys:

    arms:
      - detach
      - {label: "Policy 0.5", regime: policy, mtp_coef: 0.5}

Every arm x seed starts from the same model and is evaluated on the same questions, so overrides may touch the
training fields only, never the model, the data or what `compare` itself sets per run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.regimes import REGIMES

# Set by `compare` for every run, or shared by all arms so that their results pair up.
RESERVED_FIELDS = frozenset({"mtp_regime", "seed", "output_dir", "resume_from_checkpoint", "run_name",
                             "logging_dir", "overwrite_output_dir"})


@dataclass(frozen=True)
class Arm:
    label: str
    regime: str
    overrides: dict = field(default_factory=dict)  # field name -> value (as text or a YAML scalar)

    @property
    def slug(self) -> str:
        """The arm's run directory name (without the seed)."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label).strip("_") or self.regime

    def cli_args(self) -> list[str]:
        args = ["--mtp_regime", self.regime]
        for name, value in self.overrides.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            args += [f"--{name}", text]
        return args


def _arm_from_text(text: str) -> Arm:
    parts = [p.strip() for p in text.strip().split("@")]
    regime, overrides = parts[0], {}
    for part in parts[1:]:
        if "=" not in part:
            raise ValueError(f"arm {text!r}: override {part!r} is not field=value")
        name, value = (s.strip() for s in part.split("=", 1))
        if not name:
            raise ValueError(f"arm {text!r}: override {part!r} has no field name")
        overrides[name] = value
    return Arm(label=text.strip(), regime=regime, overrides=overrides)


def _arm_from_mapping(item: dict, index: int) -> Arm:
    item = dict(item)
    regime = item.pop("regime", None)
    if regime is None:
        raise ValueError(f"arms[{index}] {item!r}: no `regime`")
    label = item.pop("label", None)
    overrides = {str(k): v for k, v in item.items()}
    if label is None:
        label = "@".join([str(regime)] + [f"{k}={v}" for k, v in overrides.items()])
    return Arm(label=str(label), regime=str(regime), overrides=overrides)


def parse_arms(spec, allowed_fields) -> list[Arm]:
    """Arms from a comma-separated string or a YAML list; every regime, field and label checked, the arm named
    in the error."""
    if isinstance(spec, str):
        arms = [_arm_from_text(t) for t in spec.split(",") if t.strip()]
    elif isinstance(spec, (list, tuple)):
        arms = []
        for i, item in enumerate(spec):
            if isinstance(item, str):
                arms.append(_arm_from_text(item))
            elif isinstance(item, dict):
                arms.append(_arm_from_mapping(item, i))
            else:
                raise ValueError(f"arms[{i}]: expected a string like 'occ@occ_clip=true' or a mapping, got {item!r}")
    else:
        raise ValueError(f"arms must be a comma-separated string or a list, got {type(spec).__name__}")
    if not arms:
        raise ValueError("arms: no arm given")
    allowed = set(allowed_fields) - RESERVED_FIELDS
    for arm in arms:
        if arm.regime not in REGIMES:
            raise ValueError(f"arm {arm.label!r}: unknown regime {arm.regime!r} (choose from {', '.join(REGIMES)})")
        for name in arm.overrides:
            if name in RESERVED_FIELDS:
                raise ValueError(f"arm {arm.label!r}: {name!r} is set by compare itself and cannot be overridden")
            if name not in allowed:
                raise ValueError(f"arm {arm.label!r}: unknown or not overridable field {name!r} (arms override "
                                 "training fields of MTPGRPOConfig; the model and data are shared by all arms)")
    seen = {}
    for arm in arms:
        if arm.slug in seen:
            raise ValueError(f"arms {seen[arm.slug]!r} and {arm.label!r} share the run directory name {arm.slug!r}; "
                             "give them distinct labels")
        seen[arm.slug] = arm.label
    return arms
