"""Peak host memory of the final export (`mpo.train.export.export_final`) against the whole-state way
(every tensor cloned, then `save_pretrained`), on a random Llama on the CPU.

    MALLOC_MMAP_THRESHOLD_=65536 python bench/bench_export.py new|whole [--hidden 512 --layers 7 --shard-mb 16]

Prints one JSON line. The peak is VmHWM - VmRSS of this process around the second of two exports
(the first imports and warms up what the export uses); the malloc setting returns freed blocks
to the system so the peak is what is held at once.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from mpo.distributed import Dist
from mpo.train.export import export_final


def status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def whole_state_export(model, run: Path) -> None:
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    persistent = set(model.state_dict())
    state.update({n: b.detach().cpu().clone() for n, b in model.named_buffers() if n in persistent})
    model.save_pretrained(run / "final", state_dict=state, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("how", choices=("new", "whole"))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--shard-mb", type=float, default=16)
    args = parser.parse_args()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                         vocab_size=2048, tie_word_embeddings=False))
    engine, source = SimpleNamespace(module=SimpleNamespace(model=model, lora=None)), Path(tempfile.mkdtemp())
    shard = int(args.shard_mb * 2**20)
    for _ in range(2):
        run = Path(tempfile.mkdtemp())
        before = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        if args.how == "new":
            export_final(engine, source, run, Dist(0, 1, 0, torch.device("cpu")), zero_stage=0, max_shard_bytes=shard)
        else:
            whole_state_export(model, run)
        seconds, peak = time.perf_counter() - start, status("VmHWM") - before
    print(json.dumps({"how": args.how, "model_bytes": sum(t.nbytes for t in model.state_dict().values()),
                      "shard_bytes": shard, "peak_extra_bytes": peak, "seconds": round(seconds, 2),
                      "files": len(list((run / "final").glob("*.safetensors")))}))


if __name__ == "__main__":
    main()
