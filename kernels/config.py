"""Tile configurations and the interpreter switch for the Triton kernels.

The kernels live in the repository's top-level `kernels/` and are imported as `mpo.kernels`
(`mpo/kernels` links to that folder, and the wheel carries them there). They know nothing of
models: hidden states and an LM-head weight in, log-probs, sequence sums, losses and gradients out.
`lm_head` is the Triton path, `reference` the PyTorch path with the same interface; `mpo` wraps
both in autograd functions. The folder has no `__init__.py` on purpose: a package named `kernels`
at the checkout root would shadow the PyPI package of that name, which transformers imports, while
a folder without one does not (a namespace portion loses to a regular package anywhere on
sys.path). What a package `__init__` would hold lives here.

One fixed configuration per GPU family (DESIGN.md: no autotuning by default). The interpreter runs
every program instance as NumPy calls on the CPU, so there fewer, larger tiles are faster, while
tests pass smaller tiles explicitly to exercise multi-tile, multi-split and multi-chunk paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when a kernel is decorated, so what counts is its value when the
    kernels were imported (`INTERPRETED`); `mpo.logprobs` checks the two agree.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton decides interpreted-or-compiled when a kernel is decorated. Importing `mpo.kernels.<any>`
# first imports `mpo`, whose `mpo.logprobs` imports this module before any kernel is decorated, so
# this is the mode the kernels were built in; callers compare it with the environment at call time.
INTERPRETED = interpreting()


@dataclass(frozen=True)
class TileConfig:
    # logit tiles (forward partial LSE and backward dlogits): BLOCK_M rows x BLOCK_V vocab,
    # contracted over D in steps of BLOCK_D.
    block_m: int = 128
    block_v: int = 128
    block_d: int = 64
    # fp32 registers per logit tile = block_m * block_v; 8 warps hold 128x128 without spilling.
    num_warps: int = 8
    num_stages: int = 3
    # gradient matmuls (dW = dZ^T H, dH += dZ W).
    mm_block_m: int = 128
    mm_block_n: int = 128
    mm_block_k: int = 64
    mm_group_m: int = 8
    mm_num_warps: int = 8
    mm_num_stages: int = 3
    # The backward's dlogits scratch ([rows, V chunk] in the input dtype): as many columns as fit
    # scratch_bytes, but at least min_chunk_cols. Every chunk reads and writes the fp32 dH
    # accumulator (8*M*D bytes) against 6*M*D*chunk flops, so narrow chunks turn the backward
    # memory-bound: at ~800 TFLOP/s and 3.35 TB/s the traffic costs ~320/chunk of the matmul time
    # (8% at 4096 columns). Large M therefore grows the scratch rather than the chunk count.
    scratch_bytes: int = 64 << 20
    min_chunk_cols: int = 4096
    # Grid size the forward aims for by splitting V; ~4 waves of a 132-SM H100.
    target_programs: int = 528

    def with_(self, **changes) -> TileConfig:
        return replace(self, **changes)


_INTERPRETER = TileConfig(
    block_m=64, block_v=64, block_d=64, num_warps=1, num_stages=1,
    mm_block_m=64, mm_block_n=64, mm_block_k=64, mm_group_m=4, mm_num_warps=1, mm_num_stages=1,
    min_chunk_cols=0, target_programs=8,
)
_HOPPER = TileConfig()
_AMPERE = TileConfig(num_stages=2, target_programs=432)
_OTHER = TileConfig(block_m=64, block_v=64, num_warps=4, num_stages=2, mm_block_m=64, mm_block_n=64,
                    mm_num_warps=4, mm_num_stages=2, target_programs=256)
# fp32 inputs take exact fp32 products on the CUDA cores (no tensor cores): the logit tile and its
# fp32 operands must fit the register file without spilling, hence smaller tiles.
_FP32_TILES = dict(block_m=64, block_v=64, block_d=32, num_warps=4, num_stages=2,
                   mm_block_m=64, mm_block_n=64, mm_block_k=32, mm_num_warps=4, mm_num_stages=2)


def family_config(compute_capability: int, dtype: torch.dtype) -> TileConfig:
    """The fixed config for a GPU family (major*10 + minor) and input dtype."""
    major = compute_capability // 10
    cfg = _HOPPER if major >= 9 else _AMPERE if major == 8 else _OTHER
    return cfg.with_(**_FP32_TILES) if dtype == torch.float32 else cfg


def default_config(device: torch.device, dtype: torch.dtype) -> TileConfig:
    if device.type != "cuda":
        return _INTERPRETER
    major, minor = torch.cuda.get_device_capability(device)
    return family_config(10 * major + minor, dtype)
