"""Mixtures of experts: the sparse blocks as ZeRO-3 leaves, active parameters, the router's load-balancing loss.

The routers are found the way transformers records them: a model class's `_can_record_outputs`
names the module class whose output (at its `index`) is the router logits (`output_router_logits`).
Each router's parent is the sparse MoE block (router, experts, any shared expert). Nothing here
lists model classes, so a family whose language model transformers records this way is covered.

ZeRO-3 gathers a module's parameters when its forward starts. Experts stored one module each are
run only when a token is routed to them, so ranks whose tokens pick different experts gather
different modules and wait on each other for ever. `leaf_blocks` makes each sparse block one
unit for ZeRO-3 (`deepspeed.utils.set_z3_leaf_modules`): all its parameters are gathered when the
block starts, whatever the routing. (transformers 5 stores a block's experts as 3-D tensors of one
module, which every rank runs; the leaf keeps it one gather per block, and keeps a model with
per-expert modules from hanging.)

The load-balancing loss is transformers' (Switch Transformer, eq. 4-6, as `load_balancing_loss_func`
computes it), over the row's own tokens: E x sum_e f_e P_e, with f_e the share of top-k choices going
to expert e and P_e its mean router probability, over all layers' tokens. Under sequence parallelism
the counts and probability sums are added over the group first: the whole row's loss, as unsplit.
"""

from __future__ import annotations

import contextlib

import torch

from mpo.distributed import group_sum
from mpo.families import family_of


def _language_modules(model) -> list[torch.nn.Module]:
    return [m for part in family_of(model.config).parts(model)["language"] for m in part.modules()]


def _recorders(modules) -> dict[type, int]:
    """transformers' records of router logits: router class -> the index of the logits in its output."""
    found = {}
    for m in modules:
        record = (getattr(type(m), "_can_record_outputs", None) or {}).get("router_logits")
        if record is not None:
            found[record.target_class] = record.index
    return found


def routers(model) -> list[torch.nn.Module]:
    """The language model's routers, in layer order."""
    inside = _language_modules(model)
    classes = tuple(_recorders(inside))
    return [m for m in inside if classes and isinstance(m, classes)]


def _blocks(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(sparse MoE block, its router): each router's parent."""
    mine = {id(r) for r in routers(model)}
    return [(m, c) for m in model.modules() for c in m.children() if id(c) in mine]


def leaf_blocks(model) -> list[type]:
    """Make the sparse blocks ZeRO-3 leaves (before the engine wraps the model) -> their classes."""
    classes = list(dict.fromkeys(type(block) for block, _ in _blocks(model)))
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return classes


def active_shares(model) -> dict[int, float]:
    """Parameter id -> the share of it one token uses, for expert weights (top_k / experts); the
    rest (attention, routers, shared experts, dense layers) serve every token and are not listed.
    Experts are either 3-D tensors [experts, ...] (transformers 5; with GPT-OSS's biases [experts, n])
    or a list of one module each."""
    shares = {}
    for block, router in _blocks(model):
        experts, top_k = int(router.num_experts), int(router.top_k)
        for child in block.children():
            if child is router:
                continue
            if isinstance(child, torch.nn.ModuleList) and len(child) == experts:
                shares.update({id(p): top_k / experts for p in child.parameters()})
                continue
            params = [(p, getattr(p, "ds_shape", p.shape)) for p in child.parameters()]
            if any(len(shape) == 3 and shape[0] == experts for _, shape in params):  # an experts module
                # its weights [experts, ...] and their biases [experts, n] (GPT-OSS)
                shares.update({id(p): top_k / experts for p, shape in params if shape[0] == experts})
    return shares


def parameter_counts(model) -> tuple[int, int]:
    """(total, active per token) parameters."""
    shares = active_shares(model)
    total = active = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        active += n * shares.get(id(p), 1.0)
    return total, round(active)


def router_aux_coef(model, configured: float | None) -> float:
    """loss.router_aux_coef: as configured, or the model config's (transformers adds its
    `router_aux_loss_coef` x the loss in training only when `output_router_logits` is set; so does
    TRL's DPO trainer); 0 for a model without routers, where a positive one is refused."""
    text = model.config.get_text_config()
    if not routers(model):
        if configured:
            raise ValueError(f"loss.router_aux_coef {configured}: {type(model).__name__} has no mixture-of-experts "
                             "router")
        return 0.0
    if configured is not None:
        return float(configured)
    return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0) if getattr(text, "output_router_logits",
                                                                             False) else 0.0


class RouterLoad:
    """Each forward's router choices over the row's own tokens -> the load-balancing loss."""

    def __init__(self, model):
        self.routers = routers(model)
        self.index = _recorders(_language_modules(model))
        self.experts, self.top_k = int(self.routers[0].num_experts), int(self.routers[0].top_k)
        self._reset()

    def _reset(self) -> None:
        self.counts, self.probs, self.tokens = [], [], 0  # per layer: top-k choices and probability sums by expert

    @contextlib.contextmanager
    def recording(self, own: int):
        """Record the routers' logits of the first `own` tokens of each forward in the block (the
        row's own: not the blank image or the padding placed after them)."""
        def hook(module, args, output):
            logits = output[self.index[type(module)]] if isinstance(output, tuple) else output
            self._add(logits.reshape(-1, logits.shape[-1])[:own])

        self._reset()
        handles = [r.register_forward_hook(hook) for r in self.routers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _add(self, logits: torch.Tensor) -> None:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, self.top_k, dim=-1).indices.reshape(-1)
        self.counts.append(torch.zeros(self.experts, device=probs.device).index_add_(
            0, chosen, torch.ones(chosen.numel(), device=probs.device)))
        self.probs.append(probs.sum(0))
        self.tokens = probs.shape[0]

    def loss(self, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, share of the (layer, expert) pairs no token chose) of the recorded
        forward; `group`: the ranks holding the other parts of the row (sequence parallelism)."""
        counts, probs = torch.stack(self.counts), torch.stack(self.probs)  # [layers, experts]
        tokens = torch.tensor([float(self.tokens)], device=counts.device)
        if group is not None:
            counts, probs, tokens = group_sum(counts, group), group_sum(probs, group), group_sum(tokens, group)
        n = tokens.clamp(min=1) * len(self.counts)  # the tokens of every layer
        aux = self.experts * (counts.sum(0) / n * (probs.sum(0) / n)).sum()
        return aux, (counts == 0).float().mean()
