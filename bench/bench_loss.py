"""Benchmark the fused MPO loss against eager PyTorch, other fused implementations and cuBLAS.

Two ops on N scored tokens in P pairs (chosen and rejected responses of T tokens each):
  fwd_bwd  the training step's loss: LM head -> per-token log-probs -> chosen/rejected sums ->
           0.8 DPO + 0.2 BCO + 1.0 SFT, forward and backward (hidden and LM-head weight grads);
  fwd      the reference pass: per-pair log-prob sums, forward only.
Implementations:
  mpo        mpo.MPOLoss / mpo.linear_sequence_logps (Triton on CUDA); reward shift off, so that
             every implementation computes the same loss
  eager      materialised logits, fp32 log_softmax, gather, the torch loss
  trl        TRL's chunked log-prob (trl.kernels.ChunkedLogProbFunction) + the torch loss
  liger      Liger-Kernel's LigerFusedLinearDPOLoss: sigmoid (DPO) + NLL only, and reference-free,
             since it takes no precomputed reference log-probs; not a forward-only op
  cce        Cut Cross-Entropy linear_cross_entropy(reduction="none"), default gradient filter
  cce_exact  the same with filter_eps=None (no gradient filtering)
  cublas     the floor: the same matmuls alone with torch.mm (fwd: 2NDV; fwd_bwd: 8NDV = forward,
             recompute, dH, dW), over vocabulary chunks into a reused buffer
Before timing, each op (but liger's and cublas's) is checked against an fp32 reference of the
sums and of dH and dW; a wrong one is reported and not timed. Reported: p20/p50/p80 ms
(triton.testing.do_bench), peak memory beyond the inputs and their gradients, TFLOP/s against
8NDV (fwd_bwd) and 2NDV (fwd). A table is printed and rows are appended
to a long-format CSV.

    python bench/bench_loss.py                       # CUDA, the three model shapes, N in 4096/16384/65536
    python bench/bench_loss.py --models qwen2.5-7b --tokens 16384 --impls mpo,cublas
    python bench/bench_loss.py --cpu                 # tiny CPU smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from provenance import git_sha, versions

import mpo

MODELS = {  # name: (D, V) of the LM head
    "internvl2-8b": (4096, 92553),
    "qwen2.5-7b": (3584, 152064),
    "llama-3-8b": (4096, 128256),
}
CPU_MODELS = {"tiny": (64, 509)}
IMPLS = ("mpo", "eager", "trl", "liger", "cce", "cce_exact", "cublas")
BETA, WEIGHTS = 0.1, (0.8, 0.2, 1.0)
UNCHECKED = ("liger", "cublas")  # a different loss (DPO + NLL, reference-free); matmuls only
CSV_FIELDS = ("date", "op", "impl", "model", "N", "D", "V", "dtype", "p20_ms", "p50_ms", "p80_ms",
              "peak_mb", "tflops", "note", "device", "versions", "git_sha")


class Skip(Exception):
    """An implementation that cannot run here (not installed, no such op, needs CUDA)."""


@dataclass
class Problem:
    N: int
    D: int
    V: int
    T: int
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self):
        g = torch.Generator(device=self.device).manual_seed(0)
        self.P = self.N // (2 * self.T)
        self.hidden = torch.randn(self.N, self.D, device=self.device, generator=g).to(self.dtype)
        self.weight = (torch.randn(self.V, self.D, device=self.device, generator=g) / self.D**0.5).to(self.dtype)
        self.hidden.requires_grad_()
        self.weight.requires_grad_()
        self.targets = torch.randint(0, self.V, (self.N,), device=self.device, generator=g)
        # Row layout [2P, T]: rows 0..P-1 chosen, P..2P-1 rejected (Liger's layout). seq_ids name
        # pair i's chosen 2i and rejected 2i + 1.
        row = torch.arange(2 * self.P, device=self.device)
        row_seq = torch.where(row < self.P, 2 * row, 2 * (row - self.P) + 1)
        self.seq_ids = row_seq.repeat_interleave(self.T)
        self.ref = -torch.rand(2 * self.P, device=self.device) * self.T

    def grad_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.hidden, self.weight))

    def loss_from_token_logps(self, token_logps):
        sums, counts = mpo.sequence_logps(token_logps, self.seq_ids, 2 * self.P)
        loss, _ = mpo.preference_loss(sums[0::2], sums[1::2], self.ref[0::2], self.ref[1::2], beta=BETA,
                                      loss_weights=WEIGHTS, chosen_lengths=counts[0::2])
        return loss

    def sums_from_token_logps(self, token_logps):
        return mpo.sequence_logps(token_logps, self.seq_ids, 2 * self.P)[0]

    @torch.no_grad()
    def _reference_lse(self, h, w, chunk=8192):
        lse = torch.full((self.N,), float("-inf"), device=self.device)
        for lo in range(0, self.V, chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(h @ w[lo:lo + chunk].t(), dim=1))
        return lse

    def reference(self, chunk=8192):
        """fp32 per-sequence sums and loss gradients (dH, dW), over vocabulary chunks on the
        (rounded) inputs: what every implementation must reproduce, up to its dtype, before it
        is timed."""
        with torch.no_grad():
            h, w = self.hidden.float(), self.weight.float()
            lse = self._reference_lse(h, w, chunk)
            tok = (h * w[self.targets]).sum(1) - lse
        sums = self.sums_from_token_logps(tok).requires_grad_()
        counts = torch.bincount(self.seq_ids, minlength=2 * self.P)
        loss, _ = mpo.preference_loss(sums[0::2], sums[1::2], self.ref[0::2], self.ref[1::2], beta=BETA,
                                      loss_weights=WEIGHTS, chosen_lengths=counts[0::2])
        loss.backward()
        with torch.no_grad():
            g = sums.grad[self.seq_ids]  # d loss / d token log-prob
            dh, dw = torch.zeros_like(h), torch.empty_like(w)
            for lo in range(0, self.V, chunk):
                hi = min(lo + chunk, self.V)
                dz = -torch.exp(h @ w[lo:hi].t() - lse[:, None])
                rows = ((self.targets >= lo) & (self.targets < hi)).nonzero().squeeze(1)
                dz[rows, self.targets[rows] - lo] += 1
                dz *= g[:, None]
                dh += dz @ w[lo:hi]
                dw[lo:hi] = dz.t() @ h
        return sums.detach(), dh, dw


# --- implementations: each returns (fwd_bwd callable, fwd callable) -------------------------------------

def impl_mpo(p: Problem):
    from mpo.logprobs import resolve_impl

    # reward_shift "none": the same loss as every other implementation here (delta = 0)
    crit = mpo.MPOLoss(beta=BETA, loss_weights=WEIGHTS, reward_shift="none")
    impl_mpo.note = f"{resolve_impl('auto', p.device)} path"

    def fwd_bwd():
        loss, _ = crit(p.hidden, p.weight, p.targets, p.seq_ids, p.ref[0::2], p.ref[1::2])
        loss.backward()

    def fwd():
        with torch.no_grad():
            return mpo.linear_sequence_logps(p.hidden, p.weight, p.targets, p.seq_ids, 2 * p.P)[0]

    return fwd_bwd, fwd


def _eager_token_logps(p: Problem):
    logits = p.hidden @ p.weight.t()
    return logits.float().log_softmax(-1).gather(1, p.targets[:, None]).squeeze(1)


def _token_logps_ops(p: Problem, token_logps):
    """The two ops for an implementation that yields per-token log-probs (then the torch loss)."""
    def fwd_bwd():
        p.loss_from_token_logps(token_logps()).backward()

    def fwd():
        with torch.no_grad():
            return p.sums_from_token_logps(token_logps())

    return fwd_bwd, fwd


def impl_eager(p: Problem):
    return _token_logps_ops(p, lambda: _eager_token_logps(p))


def impl_trl(p: Problem):
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as e:
        raise Skip(f"trl not importable: {e}") from e

    def token_logps():
        # vocabulary chunk 32768: what TRL's trainer passes; outputs=(): log-probs only
        return ChunkedLogProbFunction.apply(p.hidden, p.weight, None, p.targets, 1.0, 32768, None, 1.0, ())[0]

    return _token_logps_ops(p, token_logps)


def impl_liger(p: Problem):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as e:
        raise Skip(f"liger-kernel not importable: {e}") from e
    crit = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=True, use_ref_model=False)
    x = p.hidden.view(2 * p.P, p.T, p.D)
    t = p.targets.view(2 * p.P, p.T)

    def fwd_bwd():
        crit(p.weight, x, t)[0].backward()

    return fwd_bwd, None


def _impl_cce(p: Problem, filter_eps):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Skip(f"cut-cross-entropy not importable: {e}") from e
    if p.device.type != "cuda":
        raise Skip("cce kernels need CUDA")
    if p.dtype == torch.float32:
        raise Skip("cce's backward takes 16-bit hidden states only")

    def token_logps():
        return -linear_cross_entropy(p.hidden, p.weight, p.targets, reduction="none", filter_eps=filter_eps)

    return _token_logps_ops(p, token_logps)


def impl_cce(p: Problem):
    return _impl_cce(p, "high")


def impl_cce_exact(p: Problem):
    return _impl_cce(p, None)


def impl_cublas(p: Problem, chunk: int = 16384):
    h, w = p.hidden.detach(), p.weight.detach()
    chunk = min(chunk, p.V)
    buf = torch.empty(p.N, chunk, dtype=p.dtype, device=p.device)
    dh = torch.empty_like(h)
    dw = torch.empty_like(w)

    def fwd():
        for lo in range(0, p.V, chunk):
            hi = min(lo + chunk, p.V)
            torch.mm(h, w[lo:hi].t(), out=buf[:, : hi - lo])

    def fwd_bwd():
        fwd()  # forward
        for lo in range(0, p.V, chunk):
            hi = min(lo + chunk, p.V)
            z = buf[:, : hi - lo]
            torch.mm(h, w[lo:hi].t(), out=z)  # recompute
            torch.mm(z.t(), h, out=dw[lo:hi])  # dW
            if lo == 0:
                torch.mm(z, w[lo:hi], out=dh)  # dH
            else:
                dh.addmm_(z, w[lo:hi])

    return fwd_bwd, fwd


BUILDERS = {name: globals()[f"impl_{name}"] for name in IMPLS}


# --- measurement -----------------------------------------------------------------------------------------

def measure(fn, p: Problem, *, backward: bool, reps: int) -> tuple[list[float], float | None]:
    """(p20, p50, p80) ms and peak MB beyond inputs (and their gradients when backward)."""
    def run():
        p.hidden.grad = p.weight.grad = None
        fn()

    if p.device.type == "cuda":
        import triton.testing

        run()
        torch.cuda.synchronize()
        p.hidden.grad = p.weight.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base - (p.grad_bytes() if backward else 0)
        quantiles = triton.testing.do_bench(run, quantiles=[0.2, 0.5, 0.8], rep=reps)
        return list(quantiles), peak / 2**20
    run()  # warm-up
    times = []
    for _ in range(max(3, reps // 50)):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return [q[1], statistics.median(times), q[7]], None


def agrees(op: str, fn, p: Problem, row: dict) -> bool:
    """Check an op against the fp32 reference and note the error; refuse to time a wrong result.
    fwd: the per-sequence sums (16-bit rounding of log-probs summed over T tokens is allowed);
    fwd_bwd: max |grad error| / max |reference grad| of dH and dW."""
    if not hasattr(p, "_reference"):
        p._reference = p.reference()
    sums, dh, dw = p._reference
    low = p.dtype != torch.float32
    if op == "fwd":
        err = (fn().float() - sums).abs().max().item()
        tol = (2e-2 if low else 1e-4) * p.T
        what = f"max |sum err| {err:.2g}"
    else:
        p.hidden.grad = p.weight.grad = None
        fn()
        err = max(((x.grad.float() - r).abs().max() / r.abs().max()).item()
                  for x, r in ((p.hidden, dh), (p.weight, dw)))
        p.hidden.grad = p.weight.grad = None
        tol = 5e-2 if low else 1e-3
        what = f"max grad err {err:.2g}"
    row["note"] = (row["note"] + "; " if row["note"] else "") + what
    if not err <= tol:
        row["note"] += f" > {tol:.2g}: WRONG, not timed"
        return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (a smoke run)")
    ap.add_argument("--models", default=None, help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--tokens", default=None, help="comma list of N (default 4096,16384,65536)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    ap.add_argument("--ops", default="fwd_bwd,fwd", help="comma list of fwd_bwd, fwd")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per response (T)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--rep", type=int, default=200, help="target ms of timed repetitions (do_bench rep)")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "bench_loss.csv"))
    args = ap.parse_args(argv)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.cpu:
        device, models = torch.device("cpu"), CPU_MODELS
        tokens = [int(n) for n in (args.tokens or "256").split(",")]
        seq_len = min(args.seq_len, 16)
        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --cpu for a smoke run", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        models = {m: MODELS[m] for m in (args.models.split(",") if args.models else MODELS)}
        tokens = [int(n) for n in (args.tokens or "4096,16384,65536").split(",")]
        seq_len = args.seq_len
        device_name = torch.cuda.get_device_name(device)
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        ap.error(f"unknown impls {sorted(unknown)}")
    ops = args.ops.split(",")
    bad = [n for n in tokens if n % (2 * seq_len)]
    if bad:
        ap.error(f"--tokens {bad}: N must be a multiple of 2 x --seq-len ({2 * seq_len}): P pairs of T tokens each")

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), device=device_name,
                versions=versions(("triton", "trl", "liger-kernel", "cut-cross-entropy", "mpo")),
                git_sha=git_sha(), dtype=args.dtype)
    print(f"# {device_name} | {meta['versions']} | git {meta['git_sha']} | {args.dtype}, T={seq_len}")
    header = (f"{'op':8} {'model':13} {'N':>6} {'impl':10} {'p50 ms':>9} {'p20-p80':>17} {'peak MB':>9} "
              f"{'TFLOP/s':>8}  note")
    print(header)
    rows = []
    for model, (D, V) in models.items():
        for N in tokens:
            p = Problem(N, D, V, seq_len, dtype, device)
            for impl in impls:
                try:
                    fns = BUILDERS[impl](p)
                    note = getattr(BUILDERS[impl], "note", "")
                except Skip as e:
                    fns, note = (None, None), str(e)
                for op, fn in zip(("fwd_bwd", "fwd"), fns):
                    if op not in ops:
                        continue
                    row = dict(meta, op=op, impl=impl, model=model, N=N, D=D, V=V, note=note)
                    if fn is None:
                        row["note"] = note or "no forward-only op"
                    elif impl not in UNCHECKED and not agrees(op, fn, p, row):
                        pass
                    else:
                        try:
                            q, peak = measure(fn, p, backward=op == "fwd_bwd", reps=args.rep)
                            flops = (8 if op == "fwd_bwd" else 2) * N * D * V
                            row.update(p20_ms=f"{q[0]:.3f}", p50_ms=f"{q[1]:.3f}", p80_ms=f"{q[2]:.3f}",
                                       peak_mb="" if peak is None else f"{peak:.0f}",
                                       tflops=f"{flops / (q[1] * 1e-3) / 1e12:.1f}")
                        except torch.cuda.OutOfMemoryError:
                            row["note"] = "out of memory"
                        finally:
                            p.hidden.grad = p.weight.grad = None
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                    rows.append(row)
                    spread = f"{row.get('p20_ms', '')}-{row.get('p80_ms', '')}" if row.get("p50_ms") else ""
                    print(f"{op:8} {model:13} {N:>6} {impl:10} {row.get('p50_ms', '-'):>9} {spread:>17} "
                          f"{row.get('peak_mb', '') or '-':>9} {row.get('tflops', '-'):>8}  {row['note']}")
            del p
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"# {len(rows)} rows appended to {path}")
    return 1 if any("WRONG" in r["note"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
