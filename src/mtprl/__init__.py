"""mtprl: joint training of Multi-Token-Prediction heads inside RL from verifiable rewards, with OCC
(arXiv 2605.28184).

The subpackages, each importing only from those before it (tests/test_layout.py checks it; docs/layout.md is the
map): `io` (metrics files, crash points) < `core` (losses, OCC and every other estimator, pure functions over
tensors) < `model` (heads, checkpoints, log-prob forwards) < `generation` (sampling, drafting) < `data` (tasks,
datasets, evaluation) < `training` (config, trainers, the optimizer step) < `analysis` (probe, reports,
comparisons) < `cli`. The OCC formula is `mtprl.core.occ`; the regimes `mtprl.core.regimes`; lambda per micro-batch
`mtprl.core.calibration`."""

import importlib as _importlib
import sys as _sys

from .core.gain import importance_gain
from .model.checkpoints import attach_or_load_heads, load_mtp_heads, load_pretrained, save_pretrained
from .model.logprobs import LogProbs, forward_logprobs
from .model.mtp import MTPHeads, attach_mtp_heads, get_mtp_heads
from .core.objectives import mtp_ce_loss, policy_loss
from .generation.speculative import SpeculativeOutput, speculative_generate
from .core.occ import OCCStats, exact_occ_coefficient, lambda_from_stats, occ_coefficient, occ_statistics
from .data.tasks import load_task, load_task_splits
from .training.config import MTPGRPOConfig, MTPSFTConfig
from .training.sft_trainer import MTPSFTTrainer
from .training.trainer import MTPGRPOTrainer

# The module paths shared/SPEC.md names (`mtprl.occ`, ...) stay importable: each is the same module object as its
# home in the subpackages (`import mtprl.occ` and `mtprl.core.occ` give one module, one set of globals).
SPEC_MODULES = {"mtp": "model.mtp", "objectives": "core.objectives", "occ": "core.occ", "trainer": "training.trainer",
                "speculative": "generation.speculative", "probe": "analysis.probe", "stats": "core.stats"}
for _name, _home in SPEC_MODULES.items():
    _sys.modules[f"{__name__}.{_name}"] = _importlib.import_module(f".{_home}", __name__)
    globals()[_name] = _sys.modules[f"{__name__}.{_name}"]

__version__ = "0.1.0"
