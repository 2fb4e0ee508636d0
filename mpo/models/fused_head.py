"""The policy and the fused MPO loss as one module, shaped for DeepSpeed (ZeRO-3 included).

The engine must run the loss inside its forward (so its gradient-reduction hooks fire), and under
ZeRO-3 every parameter is a 0-element shard outside its own module's forward. The fused loss reads
the LM-head weight directly (the logits are never formed), so `PolicyWithLoss` puts the loss in a
submodule and registers the weight (and bias) as that submodule's external parameters: ZeRO-3
then gathers them for the loss's forward and again for its backward, which recomputes the logit
tiles. Tied embeddings need nothing more: the shared Parameter is simply gathered for both uses.

Vision-language models run their vision tower on every row, first (see `scored_hidden_states`).
A mixture of experts adds its routers' load-balancing loss (`mpo.models.moe`), each row's weighted
by its share of the step's pairs, as the preference terms are: the step's loss is then the
pair-weighted mean of its rows' (blank rows weigh nothing), however the rows are dealt to ranks.
"""

from __future__ import annotations

import torch

from mpo.data.packing import PackedBatch
from mpo.models.loading import lm_head, scored_hidden_states
from mpo.models.moe import RouterLoad
from mpo.models.sequence_parallel import Shard
from mpo.mpo_loss import MPOLoss


class _LossHead(torch.nn.Module):
    def __init__(self, criterion: MPOLoss):
        super().__init__()
        self.criterion = criterion

    def forward(self, hidden, weight, bias, labels, seq_ids, ref_chosen, ref_rejected, pair_count, tokens):
        return self.criterion(hidden, weight, labels, seq_ids, ref_chosen, ref_rejected, bias,
                              chosen_token_count=tokens, pair_count=pair_count)


class PolicyWithLoss(torch.nn.Module):
    """forward(batch, ref_chosen [P], ref_rejected [P], *, pair_count, chosen_token_count, scale)
    -> (scale x loss, metrics) for one packed row; the counts are the step's global normalisers."""

    def __init__(self, model, criterion: MPOLoss, *, zero3: bool, attention: str = "auto", lora=None,
                 shard: Shard | None = None, router_aux_coef: float = 0.0):
        super().__init__()
        self.router_aux_coef = router_aux_coef
        self.router_load = RouterLoad(model) if router_aux_coef else None
        self.model, self.shard = model, shard  # shard: this rank's part of each row (sequence parallelism)
        self.lora = lora  # peft's LoraConfig of the adapters in `model` (the export merges them); None: no LoRA
        self.loss_head = _LossHead(criterion)
        self.attention = attention
        if zero3:
            import deepspeed

            head = lm_head(model)
            for param in (head.weight, head.bias):
                if param is not None:
                    deepspeed.zero.register_external_parameter(self.loss_head, param)

    @property
    def reward_shift(self):
        return self.loss_head.criterion.reward_shift

    def end_step(self, applied: bool) -> None:
        """After an optimizer step: the loss folds the step's rewards into its reward shift."""
        self.loss_head.criterion.end_step(applied)

    def forward(self, batch: PackedBatch, ref_chosen, ref_rejected, *, pair_count, chosen_token_count,
                scale: float = 1.0):
        hidden, labels, seq_ids = scored_hidden_states(self.model, batch, backend=self.attention, shard=self.shard,
                                                       router_load=self.router_load)
        head = lm_head(self.model)
        loss, metrics = self.loss_head(hidden, head.weight, head.bias, labels, seq_ids, ref_chosen, ref_rejected,
                                       pair_count, chosen_token_count)
        if self.router_load is not None:
            aux, idle = self.router_load.loss(None if self.shard is None else self.shard.group)
            loss = loss + self.router_aux_coef * aux * (batch.num_pairs / pair_count)
            metrics = {**metrics, "loss/router_aux": aux.detach(), "router/idle_experts": idle}
        return loss * scale, metrics
