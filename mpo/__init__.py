"""mpo: Mixed Preference Optimization for (multimodal) language models.

The public surface: fused LM-head log-probs and their per-sequence sums, the preference-loss
library with the BCO reward shift, and the end-to-end fused MPO loss.
"""

from mpo.logprobs import linear_logprobs, linear_sequence_logps
from mpo.losses import PAIR_LOSSES, RewardShift, preference_loss, register_pair_loss
from mpo.mpo_loss import MPOLoss
from mpo.sequences import sequence_logps

__version__ = "0.1.0"

__all__ = [
    "MPOLoss",
    "PAIR_LOSSES",
    "RewardShift",
    "linear_logprobs",
    "linear_sequence_logps",
    "preference_loss",
    "register_pair_loss",
    "sequence_logps",
]
