"""Compile every kernel for a GPU target without a GPU, and report its resources.

Runs the real launchers (`mpo.kernels.lm_head`, `mpo.kernels.mpo_pair_loss`) on CPU tensors
while intercepting each Triton launch: the launch's arguments go through Triton's own binder (so
the specialisation - stride == 1, 16-byte alignment, divisibility by 16 - is exactly what a GPU
launch would get) and are compiled for the target with ptxas. Reports registers per thread,
spill stack bytes, shared memory and whether Hopper's wgmma was used. Nothing is timed. Exits 1
if a 16-bit kernel spills at aligned shapes (D a multiple of 16), the ones real models have.

    python bench/kernel_resources.py --cc 90 --cc 80 [--dtype bf16] [--D 4096 --V 152064]

Must run without TRITON_INTERPRET (it imports the compiled kernels).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_resources.py compiles real kernels: unset TRITON_INTERPRET")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from mpo.kernels import config, lm_head  # noqa: E402
from mpo.kernels.mpo_pair_loss import mpo_pair_loss  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class Compiler:
    """Stands in for JITFunction.run: compiles each distinct specialisation once for `target`."""

    def __init__(self, cc: int):
        self.target = GPUTarget("cuda", cc, 32)
        self.backend = make_backend(self.target)
        self.rows: dict[tuple, dict] = {}
        self.shape = "aligned"  # which exercise is running: "aligned" or "odd"

    def run(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization,
                                                              options)
        consts = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if isinstance(v, (bool, str))}
        key = (fn.__name__, str(sorted(signature.items())), str(sorted(consts.items())), str(attrs))
        if key not in self.rows:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                    options=options.__dict__)
            self.rows[key] = dict(self._resources(fn.__name__, consts, kernel, options), shape=self.shape)

    @staticmethod
    def _resources(name, consts, kernel, options) -> dict:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
        stack = int(re.search(r"STACK:(\d+)", usage).group(1))
        flags = ",".join(k for k, v in consts.items() if v is True) or "-"
        return dict(kernel=name.strip("_"), flags=flags, warps=options.num_warps, stages=options.num_stages,
                    regs=regs, spill_stack=stack, smem_kb=kernel.metadata.shared // 1024,
                    wgmma="wgmma" in kernel.asm["ptx"])


def exercise(dtype: torch.dtype, cfg, M: int, D: int, V: int, pairs: int) -> None:
    """Drive every launcher once in each mode (bias/softcap on and off, a frozen bias, token and
    segment); each distinct specialisation is compiled once."""
    hidden, weight = torch.zeros(M, D, dtype=dtype), torch.zeros(V, D, dtype=dtype)
    bias = torch.zeros(V, dtype=dtype)
    rows, targets = torch.arange(M), torch.zeros(M, dtype=torch.int64)
    cfg = cfg.with_(scratch_bytes=max(cfg.scratch_bytes, M * cfg.block_v * 2 * 4))
    for b, cap, needs in ((None, None, (True, True, False)), (bias, 30.0, (True, True, True)),
                          (bias, None, (True, False, False))):
        lse, _ = lm_head.forward(hidden, weight, b, rows, targets, temperature=1.0, softcap=cap,
                                 out=torch.zeros(M), cfg=cfg)
        lm_head.forward(hidden, weight, b, rows, targets, temperature=1.0, softcap=cap,
                        seg_offsets=torch.tensor([0, M // 2, M]), cfg=cfg)
        lm_head.backward(hidden, weight, b, rows, targets, lse, torch.zeros(M), rows, temperature=1.0,
                         softcap=cap, needs=needs, cfg=cfg)
    logps = torch.zeros(2 * pairs)
    mpo_pair_loss(logps, logps[:pairs], logps[:pairs], torch.ones(1), beta=0.1, delta=0.0,
                  weights=(0.8, 0.2, 1.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cc", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="input dtype (repeatable)")
    ap.add_argument("--D", type=int, default=4096)
    ap.add_argument("--V", type=int, default=152064)
    ap.add_argument("--M", type=int, default=512, help="rows (only their count's divisibility matters)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                    help="override a TileConfig field of the family's config, e.g. block_v=64")
    args = ap.parse_args(argv)
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
    failed = False
    for cc in args.cc or [90]:
        compiler = Compiler(cc)
        real_run = JITFunction.run
        JITFunction.run = lambda fn, *a, compiler=compiler, **k: compiler.run(fn, *a, **k)
        try:
            for name in args.dtype or ["bf16"]:
                cfg = config.family_config(cc, DTYPES[name]).with_(**overrides)
                compiler.shape = "aligned"
                exercise(DTYPES[name], cfg, args.M, args.D, args.V, pairs=64)
                # Odd shapes specialise differently (one row, one pair, D not a multiple of 16):
                # they must compile; unaligned loads may spill, which is reported, not failed.
                compiler.shape = "odd"
                exercise(DTYPES[name], cfg, 1, args.D - 1, args.V, pairs=1)
        finally:
            JITFunction.run = real_run
        print(f"sm_{cc}: D={args.D} V={args.V}")
        cols = ["kernel", "flags", "warps", "stages", "regs", "spill_stack", "smem_kb", "wgmma", "shape"]
        print("  " + " | ".join(cols) + " | dtype")
        for (_, sig, _, _), row in sorted(compiler.rows.items()):
            dtype = re.search(r"'H', '\*(\w+)'|'A', '\*(\w+)'", sig)
            tag = next((g for g in (dtype.groups() if dtype else ()) if g), "fp32")
            print("  " + " | ".join(str(row[c]) for c in cols) + f" | {tag}")
            failed |= row["spill_stack"] > 0 and tag != "fp32" and row["shape"] == "aligned"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
