"""pytest plugin for running TRL's own GRPO tests against a chosen trainer (see scripts/trl_grpo_suite.py).

The copied test file imports `GRPOConfig, GRPOTrainer` from here instead of from `trl`; which classes they are is
decided by MTPRL_TRL_SUITE_MODE (the MODES table). Loading the `trl-internal-testing/zen*` datasets is pointed at
the stand-ins on disk (MTPRL_TRL_SUITE_ZEN); models resolve through the hub cache the runner points HF_HUB_CACHE
at, so nothing else is patched.
"""

from __future__ import annotations

import importlib.util
import os

import datasets
from trl import GRPOConfig as TRLGRPOConfig
from trl import GRPOTrainer as TRLGRPOTrainer

# mode -> MTP settings applied on top of what each test sets. `several_updates`: a test that leaves
# num_iterations at TRL's default 1 gets 2, so every rollout batch is used for two optimizer updates and OCC's
# delta_RL (hence lambda) is non-zero on the second.
MODES = {
    "stock": None,
    "none": dict(mtp_regime="none"),
    "occ": dict(mtp_regime="occ", several_updates=True),
    "occ_trl_defaults": dict(mtp_regime="occ"),
    "occ_head_loss": dict(mtp_regime="occ", mtp_head_loss="ce"),
}
MODE = os.environ.get("MTPRL_TRL_SUITE_MODE", "stock")
if MODE not in MODES:
    raise ValueError(f"MTPRL_TRL_SUITE_MODE={MODE!r}: expected one of {sorted(MODES)}")

if MODES[MODE] is None:
    GRPOConfig, GRPOTrainer = TRLGRPOConfig, TRLGRPOTrainer
else:
    from mtprl import MTPGRPOConfig, MTPGRPOTrainer

    _settings = dict(MODES[MODE])
    _several_updates = _settings.pop("several_updates", False)

    class GRPOConfig(MTPGRPOConfig):
        """MTPGRPOConfig with this mode's MTP settings; every other field as the test passes it."""

        def __post_init__(self):
            for key, value in _settings.items():
                setattr(self, key, value)
            if _several_updates and self.num_iterations == 1:
                self.num_iterations = 2
            super().__post_init__()

    GRPOTrainer = MTPGRPOTrainer


def _missing_import_helpers():
    # The tests' testing_utils imports availability helpers by name; a helper the installed TRL dropped is
    # answered from the package index instead (same meaning: is the package importable).
    import_utils = importlib.import_module("trl.import_utils")
    for name, package in {"is_joblib_available": "joblib"}.items():
        if not hasattr(import_utils, name):
            setattr(import_utils, name, lambda package=package: importlib.util.find_spec(package) is not None)


_missing_import_helpers()

_load_dataset = datasets.load_dataset


def _load_dataset_offline(path, name=None, *args, **kwargs):
    if isinstance(path, str) and path.startswith("trl-internal-testing/zen"):
        from standins import load_zen

        if path != "trl-internal-testing/zen":
            raise FileNotFoundError(f"no offline stand-in for {path} (image datasets are left out)")
        return load_zen(os.environ["MTPRL_TRL_SUITE_ZEN"], name, **kwargs)
    return _load_dataset(path, name, *args, **kwargs)


datasets.load_dataset = _load_dataset_offline
