"""The data path at scale: the index's cost pass (text and 448-px image pairs, per worker count),
full rendering for comparison, and the memory a 1M-pair index takes in a training process.

Data is generated: TRL-style text pairs, and MMPR image pairs over 1024x768 JPEGs, for the tiny
InternVL model's tokenizer with its image processor set to InternVL2's 448-px tiles, up to 12 a
pair (what the tile and token counts depend on; the weights play no part here).

    python bench/bench_data.py [--text 4000] [--images 800] [--workers 0 1 2] [--index-pairs 1000000]
"""

import argparse
import json
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


def model_with_448_tiles(root: Path) -> Path:
    model = build_tiny_model(root / "model", "internvl")
    pre = json.loads((model / "preprocessor_config.json").read_text())
    pre.update(size={"height": 448, "width": 448}, max_patches=12)
    (model / "preprocessor_config.json").write_text(json.dumps(pre))
    return model


def write_data(root: Path, text: int, images: int) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    words = ["the", "area", "of", "triangle", "is", "answer", "because", "so", "we", "get", "x", "=", "3", "7"]
    sentence = lambda n: " ".join(rng.choice(words, n))
    with (root / "text.jsonl").open("w") as f:
        for i in range(text):
            f.write(json.dumps({"prompt": f"Question {i}: {sentence(40)}?", "chosen": sentence(120),
                                "rejected": sentence(110)}) + "\n")
    (root / "images").mkdir()
    for k in range(16):
        Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(root / "images" / f"{k}.jpg")
    with (root / "mmpr.jsonl").open("w") as f:
        for i in range(images):
            f.write(json.dumps({"image": f"images/{i % 16}.jpg", "question": f"<image>\n{sentence(40)}?",
                                "chosen": sentence(120), "rejected": sentence(110)}) + "\n")
    return root / "text.jsonl", root / "mmpr.jsonl"


def cost_pass(data: Path, model: Path, workers: int) -> float:
    key = index_key(model, data, RENDERING)
    t0 = time.perf_counter()
    index = build_index(DataSource(data), model, RENDERING, Rejects(strict=True), key, workers=workers)
    return len(index) / (time.perf_counter() - t0)


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=int, default=4000)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--index-pairs", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp())
    try:
        # first: the memory probe, before anything else raises the peak
        model = model_with_448_tiles(root)
        text, mmpr = write_data(root, args.text, args.images)
        print(json.dumps({"index_memory": index_memory(root, args.index_pairs, model, text)}), flush=True)
        for workers in args.workers:
            t, i = cost_pass(text, model, workers), cost_pass(mmpr, model, workers)
            print(json.dumps({"workers": workers, "cost_pass_text_pairs_s": round(t, 1),
                              "cost_pass_image_pairs_s": round(i, 1), "image_over_text_time": round(t / i, 2)}),
                  flush=True)
        bare = bare_tokenization(text, model)
        print(json.dumps({"bare_chat_template_tokenize_pairs_s": round(bare, 1)}), flush=True)
        print(json.dumps({"full_render_image_pairs_s": round(full_render(mmpr, model, 100), 2),
                          "full_render_text_pairs_s": round(full_render(text, model, 1000), 1)}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
