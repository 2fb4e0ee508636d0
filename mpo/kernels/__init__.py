"""Triton kernels for the fused LM head and the MPO loss (imported as `mpo.kernels`).

They know nothing of models: hidden states and an LM-head weight in, log-probs, sequence sums,
losses and gradients out. `lm_head` is the Triton path, `reference` the PyTorch path with the
same interface; `mpo` wraps both in autograd functions.
"""

from .config import TileConfig, default_config, interpreting

# Triton decides interpreted-or-compiled when a kernel is decorated, i.e. when this package is
# first imported; callers compare this with the environment at call time.
INTERPRETED = interpreting()

__all__ = ["INTERPRETED", "TileConfig", "default_config", "interpreting"]
