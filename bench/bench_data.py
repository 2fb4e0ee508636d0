"""The data path at scale: the index's cost pass over text pairs and over image pairs of the same
text (per model family and worker count), full rendering for comparison, and the memory a
1M-pair index takes in a training process.

Data is generated: TRL-style pairs of ~40-word prompts and ~115-word responses, written twice,
once as text pairs and once with one 1280x960 JPEG each ("<image>\\n" before the same prompt).
The models are the tiny InternVL and Qwen2.5-VL ones with their processors set to the released
models' image sizing, which is all the token and tile counts depend on (the weights play no part):

- InternVL (InternVL2/3): 448-px tiles, up to 12 + the thumbnail, 256 tokens a tile: a 1280x960
  image is 13 tiles, 3,328 image tokens;
- Qwen2.5-VL: 14-px patches merged 2x2, 3,136 to 12,845,056 pixels an image: a 1280x960 image is
  resized to 1288x952, 1,564 image tokens.

    python bench/bench_data.py [--text 2000] [--images 2000] [--workers 0 1 2] [--index-pairs 1000000]
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpo.data.dataset import PairDataset
from mpo.data.formats import DataSource, read_pairs
from mpo.data.index import FIELDS, PairIndex, build_index, index_key
from mpo.data.packing import PackingOptions
from mpo.data.records import Rejects
from mpo.data.render import Renderer
from mpo.models.tiny import build_tiny_model

RENDERING = {"packing": "prefix", "max_tokens": 16384, "overlong": "truncate", "max_patches": None,
             "min_pixels": None, "max_pixels": None, "max_image_pixels": 50_000_000}
IMAGE_SIZE = (1280, 960)  # width, height
# The released processors' image settings (OpenGVLab/InternVL3-*-hf, Qwen/Qwen2.5-VL-*-Instruct).
SIZING = {"internvl": ({"size": {"height": 448, "width": 448}, "max_patches": 12}, {"image_seq_length": 256}),
          "qwen2_5_vl": ({"size": {"shortest_edge": 3136, "longest_edge": 12845056}, "patch_size": 14,
                          "merge_size": 2}, {})}


def released_sizing(root: Path, arch: str) -> Path:
    """A tiny model folder whose image processor (both of its config files) sizes as released."""
    model = build_tiny_model(root / arch, arch)
    image, processor = SIZING[arch]
    pre = json.loads((model / "preprocessor_config.json").read_text())
    (model / "preprocessor_config.json").write_text(json.dumps({**pre, **image}))
    nested = json.loads((model / "processor_config.json").read_text())
    nested.update(processor, image_processor={**nested["image_processor"], **image})
    (model / "processor_config.json").write_text(json.dumps(nested))
    return model


def write_data(root: Path, text: int, images: int) -> tuple[Path, Path]:
    """(text pairs, image pairs): the image pairs are the first `images` text pairs with an image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    words = ["the", "area", "of", "triangle", "is", "answer", "because", "so", "we", "get", "x", "=", "3", "7"]
    sentence = lambda n: " ".join(rng.choice(words, n))
    records = [{"prompt": f"Question {i}: {sentence(40)}?", "chosen": sentence(120), "rejected": sentence(110)}
               for i in range(max(text, images))]
    (root / "images").mkdir()
    files = [root / "images" / f"{k}.jpg" for k in range(16)]
    for f in files:
        Image.fromarray(rng.integers(0, 255, (*IMAGE_SIZE[::-1], 3), dtype=np.uint8)).save(f)
    with (root / "text.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[:text])
    with (root / "images.jsonl").open("w") as f:
        f.writelines(json.dumps({**r, "prompt": f"<image>\n{r['prompt']}", "images": [str(files[i % 16])]}) + "\n"
                     for i, r in enumerate(records[:images]))
    return root / "text.jsonl", root / "images.jsonl"


def cpu_seconds() -> float:
    """This process's CPU time and its finished workers' (the machine is shared: wall time is not all ours)."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def cost_pass(data: Path, model: Path, workers: int) -> tuple[float, float]:
    """(pairs per wall second, pairs per CPU second) of building the index."""
    key = index_key(model, data, RENDERING)
    t0, c0 = time.perf_counter(), cpu_seconds()
    index = build_index(DataSource(data), model, RENDERING, Rejects(strict=True), key, workers=workers)
    return len(index) / (time.perf_counter() - t0), len(index) / (cpu_seconds() - c0)


def image_tokens(data: Path, model: Path) -> tuple[int, int]:
    """(image slots, tiles or patches) of the first image pair."""
    renderer = Renderer(model)
    pair = renderer.render(next(iter(read_pairs(data, Rejects(strict=True)))), pixels=False)
    return renderer.images.slots(pair.tiles), pair.tiles


def bare_tokenization(data: Path, model: Path) -> float:
    """apply_chat_template + tokenization of the same texts, nothing else."""
    tok = Renderer(model).tokenizer
    pairs = list(read_pairs(data, Rejects(strict=True)))
    t0 = time.perf_counter()
    for p in pairs:
        prompt = tok.apply_chat_template(list(p.prompt), tokenize=False, add_generation_prompt=True)
        tok(prompt)
        for response in (p.chosen, p.rejected):
            tok(tok.apply_chat_template([*p.prompt, {"role": "assistant", "content": response}], tokenize=False))
    return len(pairs) / (time.perf_counter() - t0)


def full_render(data: Path, model: Path, limit: int) -> float:
    renderer = Renderer(model)
    pairs = list(read_pairs(data, Rejects(strict=True)))[:limit]
    t0 = time.perf_counter()
    for i, p in enumerate(pairs):
        renderer.render(p, i)
    return len(pairs) / (time.perf_counter() - t0)


def index_memory(root: Path, n: int, model: Path, text: Path) -> dict:
    """Peak RSS growth of loading an n-pair index and making the training dataset from it."""
    rng = np.random.default_rng(0)
    arrays = {name: rng.integers(1, 1000, n).astype(code) for name, code in FIELDS.items()}
    key = {"bench": n, "rendering": RENDERING}
    PairIndex(arrays, key, {}, 0).save(root / "big.safetensors")
    del arrays
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    index = PairIndex.load(root / "big.safetensors", key)
    dataset = PairDataset(DataSource(text), index, model, PackingOptions("prefix", 16384, "truncate"))
    seconds = time.perf_counter() - t0
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert len(dataset.valid) == n
    return {"pairs": n, "bytes_per_pair": round(grown / n, 1), "load_s": round(seconds, 3)}


def report_model(arch: str, model: Path, text: Path, images: Path, worker_counts: list[int]) -> None:
    slots, tiles = image_tokens(images, model)
    print(json.dumps({"model": arch, "image": "x".join(map(str, IMAGE_SIZE)), "image_tokens": slots,
                      "tiles_or_patches": tiles}), flush=True)
    for workers in worker_counts:
        (t, t_cpu), (i, i_cpu) = cost_pass(text, model, workers), cost_pass(images, model, workers)
        print(json.dumps({"model": arch, "workers": workers, "cost_pass_text_pairs_s": round(t, 1),
                          "cost_pass_image_pairs_s": round(i, 1), "image_over_text_time": round(t / i, 2),
                          "text_pairs_per_cpu_s": round(t_cpu, 1), "image_pairs_per_cpu_s": round(i_cpu, 1),
                          "image_over_text_cpu": round(t_cpu / i_cpu, 2),
                          "load_average_1min": round(os.getloadavg()[0], 1)}), flush=True)
    print(json.dumps({"model": arch, "full_render_image_pairs_s": round(full_render(images, model, 50), 2),
                      "full_render_text_pairs_s": round(full_render(text, model, 1000), 1)}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=int, default=2000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--index-pairs", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp())
    try:
        # first: the memory probe, before anything else raises the peak
        models = {arch: released_sizing(root, arch) for arch in SIZING}
        text, images = write_data(root, args.text, args.images)
        print(json.dumps({"index_memory": index_memory(root, args.index_pairs, models["internvl"], text)}),
              flush=True)
        for arch, model in models.items():
            report_model(arch, model, text, images, args.workers)
        bare = bare_tokenization(text, models["internvl"])
        print(json.dumps({"bare_chat_template_tokenize_pairs_s": round(bare, 1)}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
