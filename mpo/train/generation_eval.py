"""Held-out questions answered during training (`data.eval_prompts`): eval/accuracy beside the rewards.

The prompts are `mpo eval`'s (question, answer, optional images), asked with the same instruction,
answered greedily by the policy being trained and judged by the same rules, so the numbers match
`mpo eval` on a saved model. Every rank answers its share (question k on rank k % world); the counts
are summed over ranks and rank 0 writes the answers to <run>/generations/step-<N>.jsonl.

Under ZeRO-3 each layer's weights are gathered collectively, so every rank must run the same number
of forward passes through the same modules: the shares are padded to equal length (the padding's
answers are dropped), `generate` keeps finished ranks stepping until all are done (`synced_gpus`),
and the sampler gives a batch that would skip the vision tower a blank image. Every question is
rendered once when the run starts, so a bad image, a special token of the tokenizer typed into a
question or a question with no room for train.eval_max_new_tokens within the model's positions
stops the run then, naming its line (images resolve as data.allow_outside_root says); a failure
later, on any rank (an image gone since, out of memory), ends every rank at once (`Phase`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from mpo.atomic import write_text_atomic
from mpo.data.render import ImageOptions, Renderer
from mpo.distributed import Dist, Phase, all_gather_objects, all_sum
from mpo.errors import BadPair, DataError
from mpo.families import family_of
from mpo.generation.judging import INSTRUCTION, requests_for, verdict
from mpo.generation.prompts import positions, read_prompts, refusal
from mpo.generation.sampler import Sampler
from mpo.models.loading import enable_packed_attention


class GenerationEval:
    def __init__(self, path: str, *, model_dir: str, images: ImageOptions, image_root: str | None, dist: Dist,
                 max_new_tokens: int, batch_size: int, synced: bool, allow_outside_root: bool = False):
        from transformers import AutoConfig

        self.dist, self.max_new_tokens, self.batch_size, self.synced = dist, max_new_tokens, batch_size, synced
        self.records = read_prompts(path, need="answer", image_root=image_root, allow_outside_root=allow_outside_root)
        self.renderer = Renderer(model_dir, images)
        limit = positions(AutoConfig.from_pretrained(model_dir))
        mine = self.records[dist.rank::dist.world]
        for r, request in zip(mine, requests_for(mine, 1, INSTRUCTION)):
            try:
                self.renderer.prompt(request.messages, request.images)
            except BadPair as bad:
                raise DataError(f"{r.source}: data.eval_prompts: {bad}") from None
            bad = refusal(self.renderer, request, (r.question,), max_new_tokens=max_new_tokens, limit=limit,
                          setting="train.eval_max_new_tokens")
            if bad is not None:
                raise DataError(f"{r.source}: data.eval_prompts: {bad}")

    @torch.no_grad()
    def __call__(self, model, dtype: torch.dtype, run_dir: Path, step: int) -> dict:
        # the other ranks would otherwise wait for a failed rank in a collective until its time limit
        with Phase(self.dist, "training-time answers"):
            return self._answer(model, dtype, run_dir, step)

    def _answer(self, model, dtype: torch.dtype, run_dir: Path, step: int) -> dict:
        rank, world = self.dist.rank, self.dist.world
        mine = list(range(rank, len(self.records), world))
        share = -(-len(self.records) // world)
        padded = mine + [mine[0] if mine else 0] * (share - len(mine))
        requests = requests_for([self.records[k] for k in padded], 1, INSTRUCTION)
        sampler = Sampler(model, self.renderer, device=self.dist.device, dtype=dtype,
                          max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, synced=self.synced)
        was_training = model.training
        model.eval()
        try:
            with standard_attention(model):
                done = sampler.generate(requests, temperature=0.0)[:len(mine)]
        finally:
            model.train(was_training)  # the caller's model leaves in the mode it came in, whatever happened
        items = []
        for k, c in zip(mine, done):
            if isinstance(c, BadPair):
                raise DataError(f"{self.records[k].source}: data.eval_prompts: {c}")
            items.append({"id": self.records[k].id, "answer": self.records[k].answer, "response": c.text,
                          "verdict": verdict(c.text, self.records[k].answer), "truncated": c.truncated})
        correct, answered, truncated = all_sum([sum(i["verdict"] == "correct" for i in items),
                                                sum(i["verdict"] != "unparsable" for i in items),
                                                sum(i["truncated"] for i in items)], self.dist.device)
        gathered = all_gather_objects(items)
        if self.dist.main:
            order = {r.id: k for k, r in enumerate(self.records)}
            rows = sorted((i for part in gathered for i in part), key=lambda i: order[i["id"]])
            write_text_atomic(run_dir / "generations" / f"step-{step}.jsonl",
                              "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in rows))
        n = len(self.records)
        return {"accuracy": correct / n, "with_trigger": answered / n, "truncated": truncated / n, "questions": n}


@contextmanager
def standard_attention(model):
    """Generation runs the model's ordinary batched, cached forward: packed attention needs packed rows.
    SDPA where the language model has it, else its eager attention (GPT-OSS: sinks)."""
    family = family_of(model.config)
    language = family.parts(model)["language"][0]
    model.set_attn_implementation(family.attention("sdpa" if language._supports_sdpa else "eager"))
    try:
        yield
    finally:
        enable_packed_attention(model)
