"""The `mpo` command (also `python -m mpo`). Each subcommand registers a parser and a handler."""

from __future__ import annotations

import argparse
import platform
import sys


def _env(args: argparse.Namespace) -> int:
    """Print what the kernels would run on: versions, devices, and the dispatch decision."""
    import torch

    import mpo
    from mpo.kernels.config import interpreting
    from mpo.logprobs import resolve_impl

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"mpo {mpo.__version__}, python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {triton_version}")
    if device.type == "cuda":
        print(f"cuda {torch.version.cuda}: {torch.cuda.get_device_name(device)}")
    else:
        print("cuda: not available" + (" (TRITON_INTERPRET=1: kernels run on the interpreter)"
                                       if interpreting() else ""))
    print(f"linear_logprobs on {device.type} tensors runs the {resolve_impl('auto', device)} path")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import mpo

    parser = argparse.ArgumentParser(prog="mpo", description="Mixed Preference Optimization for "
                                     "(multimodal) language models, with fused Triton kernels.")
    parser.add_argument("--version", action="version", version=f"mpo {mpo.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser("env", help="show versions, devices and which kernel path runs")
    env.set_defaults(handler=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)
