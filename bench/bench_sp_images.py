"""The images of a row under sequence parallelism: every rank of the group encoding all of them, or
the ranks sharing them (each encodes its share, the features are gathered: what mpo does), on the
CPU over gloo.

    python bench/bench_sp_images.py [--sp 2 --tiles 12 --layers 2]

InternVL with InternViT-300M's vision tower (width 1024, 16 heads, 448-pixel tiles of 1025 tokens)
cut to --layers layers (per-layer costs are what differ; a full tower has 24), random weights;
one row's --tiles tiles (InternVL3.5 trains with up to 12). Each rank scores its own part of the
feature rows, as the language model's shards do, and backpropagates through the projector and the
tower. Measured per rank: the bytes autograd keeps for backward (weights not counted) and the wall
time of forward + backward; the bytes the sharing moves are the features (gathered
forward, their gradients summed backward). Prints a table and one JSON line per rank and way.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from ranks import report, run_workers


def model(layers: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
              "num_hidden_layers": layers, "image_size": [448, 448], "patch_size": [14, 14],
              "use_qk_norm": False, "layer_scale_init_value": 0.1}
    text = {"model_type": "qwen2", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 1,
            "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024}
    config = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=256)
    return InternVLForConditionalGeneration(config).eval()


def measure(net, family, pixels, shard, share: bool) -> dict:
    from contextlib import nullcontext

    config = net.config
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    net.zero_grad()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            shard.images_shared(family, net) if share else nullcontext():
        features = net.model.get_image_features(pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
                                                vision_feature_select_strategy=config.vision_feature_select_strategy
                                                ).pooler_output.flatten(0, 1)
    part = slice(shard.rank * len(features) // shard.world, (shard.rank + 1) * len(features) // shard.world)
    features[part].square().mean().backward()
    seconds = time.perf_counter() - start
    moved = features.numel() * features.element_size() * 2 if share else 0  # gathered, then the gradients summed
    return {"way": "shared" if share else "every rank", "rank": shard.rank, "tiles": len(pixels),
            "activation_bytes": sum(saved.values()), "feature_bytes_moved": moved,
            "forward_backward_s": round(seconds, 2)}


def worker(a) -> list[dict]:
    import torch.distributed as dist

    from mpo.models.loading import model_family
    from mpo.models.sequence_parallel import Shard

    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # one core per rank, as on a machine of one core per rank
    net = model(a.layers)
    family, shard = model_family(net), Shard(dist.get_rank(), dist.get_world_size(), None)
    pixels = torch.randn(a.tiles, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    return [measure(net, family, pixels, shard, share) for share in (False, True)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sp", type=int, default=2, help="ranks sharing the row")
    p.add_argument("--tiles", type=int, default=12)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        report(worker(a))
    results = run_workers(__file__, a.sp, ["--tiles", str(a.tiles), "--layers", str(a.layers)])
    print(f"{'way':>10} {'rank':>4} {'tiles':>5} {'activations MB':>14} {'moved MB':>8} {'fwd+bwd s':>9}")
    for r in sorted(results, key=lambda r: (r["way"] != "every rank", r["rank"])):
        print(f"{r['way']:>10} {r['rank']:>4} {r['tiles']:>5} {r['activation_bytes'] / 2**20:>14.1f} "
              f"{r['feature_bytes_moved'] / 2**20:>8.1f} {r['forward_backward_s']:>9}")
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
