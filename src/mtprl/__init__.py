"""mtprl: joint training of Multi-Token-Prediction heads inside RL from verifiable rewards, with OCC
(arXiv 2605.28184). The OCC formula lives in `mtprl.occ`; the regimes in `mtprl.regimes`; lambda for each micro-batch in
`mtprl.calibration`."""

from .gain import importance_gain
from .checkpoints import attach_or_load_heads, load_mtp_heads, load_pretrained, save_pretrained
from .logprobs import LogProbs, forward_logprobs
from .mtp import MTPHeads, attach_mtp_heads, get_mtp_heads
from .objectives import mtp_ce_loss, policy_loss
from .speculative import SpeculativeOutput, speculative_generate
from .occ import OCCStats, exact_occ_coefficient, lambda_from_stats, occ_coefficient, occ_statistics
from .tasks import load_task, load_task_splits
from .config import MTPGRPOConfig, MTPSFTConfig
from .sft_trainer import MTPSFTTrainer
from .trainer import MTPGRPOTrainer

__version__ = "0.1.0"
