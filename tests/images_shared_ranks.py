"""Runs under torchrun for tests/test_sequence_parallel.py: `python tests/images_shared_ranks.py MODEL...`.

For each vision-language model folder: the image features of 1, 3 and 4 random images (tiles) with the
ranks sharing the encoding (`Shard.images_shared`) equal those of one process encoding them all, and
the gradients of every parameter, each rank scoring its own part of the feature rows and the ranks'
gradients summed, equal one process's (float64)."""
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForImageTextToText

from mpo.distributed import end_process
from mpo.models.loading import model_family
from mpo.models.sequence_parallel import Shard

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def images(family, count, gen):
    """`count` random images (tiles) as the image encoder's inputs -> get_image_features kwargs."""
    _, pixels, grid = family.blank_image()
    if grid is None:
        return {"pixel_values": torch.randn(count, *pixels.shape[1:], generator=gen)}
    merge = family.config.vision_config.spatial_merge_size
    grid = torch.tensor([[1, merge * (1 + i % 2), merge * (1 + i % 3)] for i in range(count)])
    return {"pixel_values": torch.randn(int(grid.prod(-1).sum()), pixels.shape[1], generator=gen),
            "image_grid_thw": grid}


def features(model, inputs):
    config = model.config
    extra = {} if "image_grid_thw" in inputs else {k: getattr(config, k) for k in (
        "vision_feature_layer", "vision_feature_select_strategy") if hasattr(config, k)}
    out = model.model.get_image_features(**inputs, **extra)
    rows = [out.pooler_output] if isinstance(out.pooler_output, torch.Tensor) else list(out.pooler_output)
    for layer in getattr(out, "deepstack_features", None) or []:
        rows += list(layer) if isinstance(layer, (tuple, list)) else [layer]
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])


for path in sys.argv[1:]:
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64)
    family = model_family(model)
    for count in (1, 3, 4):
        seed = 1000 * count + len(path)
        gen = torch.Generator().manual_seed(seed)
        inputs = images(family, count, gen)
        model.zero_grad()
        whole = features(model, inputs)
        weights = torch.randn(whole.shape, generator=gen, dtype=whole.dtype)
        (whole * weights).sum().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        largest = max(float(g.abs().max()) for g in expected.values())
        model.zero_grad()
        ran = []  # the input rows the image encoder ran on here

        def record(module, args, kwargs, out, ran=ran):
            ran.append(len(args[0] if args else kwargs["pixel_values"]))

        seen = family.image_encoder(model).register_forward_hook(record, with_kwargs=True)
        with Shard(rank, world, None).images_shared(family, model):
            split = features(model, inputs)
        seen.remove()
        rows = len(inputs["pixel_values"])
        assert len(ran) == 1 and (ran[0] < rows if count >= world else ran[0] <= rows), (path, count, ran, rows)
        torch.testing.assert_close(split, whole.detach(), rtol=1e-10, atol=1e-10, msg=f"{path} {count} seed {seed}")
        # each rank scores its own part of the feature rows, as the language model's shards do
        part = slice(rank * len(split) // world, (rank + 1) * len(split) // world)
        (split[part] * weights[part]).sum().backward()
        for name, g in expected.items():
            got = model.get_parameter(name).grad
            got = torch.zeros_like(g) if got is None else got.clone()
            dist.all_reduce(got)
            # Gemma 3's norms compute in float32 whatever the model's dtype: rounding at that level, held to
            # the largest gradient (a key bias's gradient is rounding noise: softmax ignores a shared shift)
            torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-6 * largest,
                                       msg=f"{path}: {count} images, {name}; seed {seed}")
        if rank == 0:
            print("ok", family.name, count, len(expected), flush=True)
end_process(0)
