"""Answering on ranks that generate together: a batch whose prompts all fail, a text-only batch of a
vision model, a failure inside `generate`."""

import json

import pytest
import torch

from mpo.errors import BadPair
from mpo.generation.sampler import Completion, Request, Sampler

CPU = torch.device("cpu")


def counted(sampler: Sampler) -> dict:
    """Calls of the sampler's `generate` and forwards of its vision tower, counted as they happen."""
    counts = {"generate": 0, "vision": 0}
    generate = sampler.model.generate

    def counting(**kwargs):
        counts["generate"] += 1
        return generate(**kwargs)

    sampler.model.generate = counting
    if sampler.renderer.vision:
        tower = sampler.renderer.family.parts(sampler.model)["vision"][0]
        tower.register_forward_hook(lambda *_: counts.__setitem__("vision", counts["vision"] + 1))
    return counts


@pytest.mark.parametrize("arch", ["llama", "internvl", "qwen2_vl"])
def test_a_synced_rank_generates_every_batch_even_when_no_prompt_renders(tiny_models, one_rank_group, arch):
    """The other ranks step `generate` in lockstep with this one: a batch of unrenderable prompts still
    runs it (on a stand-in whose answer is dropped), and a vision model's text-only batch still runs
    the vision tower, which another rank's images would run."""
    sampler = Sampler.load(tiny_models[arch], device=CPU, max_new_tokens=2, batch_size=2, synced=True)
    counts = counted(sampler)
    vision = sampler.renderer.vision
    unreadable = Request("bad#0", ({"role": "user", "content": "<image>\nWhat colour?"},), ("/no/such/image.png",))
    text = Request("text#0", ({"role": "user", "content": "What is 2 + 2?"},))

    out = sampler.generate([unreadable] * 3, temperature=0.0)
    assert len(out) == 3 and all(isinstance(r, BadPair) for r in out)
    assert counts == {"generate": 2, "vision": 2 if vision else 0}  # batches of 2 and 1

    out = sampler.generate([text, unreadable, text], temperature=0.0)
    assert [type(r) for r in out] == [Completion, BadPair, Completion]
    assert counts == {"generate": 4, "vision": 4 if vision else 0}
    sampler.synced = False
    alone = sampler.generate([text, unreadable, text], temperature=0.0)
    assert alone[0::2] == out[0::2] and str(alone[1]) == str(out[1])  # the stand-in answered nothing
    assert isinstance(sampler.generate([unreadable], temperature=0.0)[0], BadPair)
    assert counts == {"generate": 6, "vision": 4 if vision else 0}


def test_the_model_leaves_training_time_answering_in_the_mode_it_came_in(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    from mpo.data.render import ImageOptions
    from mpo.distributed import Dist
    from mpo.train.generation_eval import GenerationEval

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{k}", "question": f"{k} + 1?", "answer": str(k + 1)}) + "\n"
                               for k in range(3)))
    answering = GenerationEval(str(prompts), model_dir=tiny_models["llama"], images=ImageOptions(), image_root=None,
                               dist=Dist(0, 1, 0, CPU), max_new_tokens=2, batch_size=2, synced=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).train()

    def out_of_memory(**kwargs):
        assert not model.training
        raise RuntimeError("out of memory")

    model.generate = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        answering(model, torch.float32, tmp_path, step=0)
    assert model.training
    model.eval()
    with pytest.raises(RuntimeError, match="out of memory"):
        answering(model, torch.float32, tmp_path, step=0)
    assert not model.training
