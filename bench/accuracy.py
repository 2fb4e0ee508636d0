"""Accuracy of the fused log-probs and gradients against a float64 oracle, per input dtype.

For each dtype: max |error| relative to max |oracle| of the log-probs, dH and dW, for
  mpo/triton  the Triton kernels (compiled on CUDA; on a CPU, Triton's interpreter: set
              TRITON_INTERPRET=1, bf16 tiles are then upcast to fp32 after loading)
  mpo/torch   the chunked PyTorch path
  eager       materialised logits in the input dtype, fp32 log_softmax (what eager training does)
Inputs: N tokens (20% ignored), logits spread ~3, a random signed upstream gradient.

    TRITON_INTERPRET=1 python bench/accuracy.py [--N 1024 --D 256 --V 4096]
"""

import argparse

import torch

import mpo
from mpo.kernels.config import interpreting

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run(impl, h, w, t, up):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    if impl == "eager":
        lp = (h @ w.t()).float().log_softmax(-1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        lp = torch.where(t >= 0, lp, torch.zeros_like(lp))
    elif impl == "oracle":
        h64, w64 = h.double(), w.double()
        lp = (h64 @ w64.t()).log_softmax(-1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        lp = torch.where(t >= 0, lp, torch.zeros_like(lp))
    else:
        lp = mpo.linear_logprobs(h, w, t, impl=impl)
    (lp * up.to(lp.dtype)).sum().backward()
    return [x.detach().double() for x in (lp, h.grad, w.grad)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--D", type=int, default=256)
    ap.add_argument("--V", type=int, default=4096)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    impls = ["eager", "torch"] + (["triton"] if cuda or interpreting() else [])
    where = torch.cuda.get_device_name() if cuda else ("CPU, Triton interpreter" if interpreting() else "CPU")
    print(f"# {where}; torch {torch.__version__}; N={args.N} D={args.D} V={args.V}; "
          f"max|err| / max|oracle| (lower is better)")
    print(f"{'dtype':6} {'impl':13} {'logp':>10} {'dH':>10} {'dW':>10}")
    g = torch.Generator().manual_seed(0)
    h32 = torch.randn(args.N, args.D, generator=g)
    w32 = torch.randn(args.V, args.D, generator=g) * (3 / args.D**0.5)
    t = torch.randint(0, args.V, (args.N,), generator=g)
    t[torch.rand(args.N, generator=g) < 0.2] = -100
    up = torch.randn(args.N, generator=g)
    t, up = t.to(device), up.to(device)
    for name, dtype in DTYPES.items():
        h, w = h32.to(dtype).to(device), w32.to(dtype).to(device)
        oracle = run("oracle", h, w, t, up)
        for impl in impls:
            errs = [(x - o).abs().max().item() / o.abs().max().item() for x, o in zip(run(impl, h, w, t, up), oracle)]
            label = impl if impl == "eager" else f"mpo/{impl}"
            print(f"{name:6} {label:13} " + " ".join(f"{e:10.2e}" for e in errs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
