"""Packed rows of many preference pairs, each pair one document, and their token accounting.

A response token is scored at the position BEFORE it, so a sequence context + response needs
only context + response[:-1] as input: the last prompt token predicts the first response token,
and the last response token (end of turn) is a target, never an input. Per pair, with prompt p
(P tokens), chosen c (C) and rejected r (R):

- plain  : two documents [p | c[:-1]] and [p | r[:-1]]; 2P + C + R - 2 tokens, images twice.
- prefix : one document  [p[:-1] | p[-1] c[:-1] | p[-1] r[:-1]]; P + C + R - 1 tokens, images
           once. The shared part is p[:-1]; each branch starts with its own copy of the last
           prompt token (the position that predicts the branch's first token). Rejected tokens
           (branch 2) attend to the shared part and earlier rejected tokens, never to branch 1;
           both branches take positions P-1, P, ..., exactly as if run alone after the prompt.
- none   : the plain layout with one pair per row (for comparisons and debugging).

A `PackedBatch` is one packed row (batch dimension 1, no padding): input ids, position ids
(each document's own, as the model family computes them for the document alone: 0, 1, ... for
text models, M-RoPE's three rows for Qwen-VL, in which a prefix document's rejected branch takes
the ids of prompt + rejected from the prompt's end on), labels (the target each position
predicts, -100 where none), seq_ids (chosen 2k / rejected 2k+1 for the row's k-th pair, -1
elsewhere), document and branch ids, cu_seqlens (document boundaries) and the pixel values (and
Qwen-VL's image grids) of the row's images in token order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mpo.data.render import RenderedPair
from mpo.errors import BadPair

LAYOUTS = ("prefix", "plain", "none")
OVERLONG = ("truncate", "drop")
IGNORE = -100
SHARED, CHOSEN, REJECTED = 0, 1, 2


@dataclass(frozen=True)
class PackingOptions:
    layout: str = "prefix"
    max_tokens: int = 8192
    overlong: str = "truncate"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"packing must be one of {LAYOUTS}, got {self.layout!r}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"over-long policy must be one of {OVERLONG}, got {self.overlong!r}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")


def pair_cost(pair: RenderedPair, layout: str) -> int:
    """Row tokens the pair takes in `layout`."""
    P, C, R = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    return P + C + R - 1 if layout == "prefix" else 2 * P + C + R - 2


def plain_cost(pair: RenderedPair) -> int:
    return pair_cost(pair, "plain")


def fit_to_budget(pair: RenderedPair, layout: str, max_tokens: int, policy: str) -> RenderedPair:
    """Apply the over-long policy: 'truncate' cuts the responses (the longer one first, never the
    prompt) until the pair fits; 'drop' (or a prompt that cannot fit) raises BadPair('too_long'), a
    cut that leaves the responses equal or one the start of the other BadPair('identical_responses')."""
    cost = pair_cost(pair, layout)
    if cost <= max_tokens:
        return pair
    if policy not in OVERLONG:
        raise ValueError(f"over-long policy must be one of {OVERLONG}, got {policy!r}")
    C, R = len(pair.chosen_ids), len(pair.rejected_ids)
    room = max_tokens - (cost - C - R)  # what C + R may be
    if policy == "drop" or room < 2:
        raise BadPair("too_long", f"{cost} tokens in {layout} layout > {max_tokens}")
    # Water-fill: a response shorter than half the room keeps everything; the other gets the rest.
    if C <= room // 2:
        R = room - C
    elif R <= room // 2:
        C = room - R
    else:
        C, R = (room + 1) // 2, room // 2
    # A response cut to the start of the other leaves the pair nothing of its own to reject: the
    # rejected terms would push down tokens the chosen response has too. Equal cut lengths make them
    # equal, unequal ones (the odd token of an odd room goes to chosen) a prefix.
    n = min(C, R)
    if pair.chosen_ids[:n] == pair.rejected_ids[:n]:
        start = "" if C == R else f", {'rejected' if R < C else 'chosen'} the start of the other"
        raise BadPair("identical_responses", f"after cutting both to fit {max_tokens} tokens{start}")
    return dataclasses.replace(pair, chosen_ids=pair.chosen_ids[:C], rejected_ids=pair.rejected_ids[:R])


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, L] int64
    position_ids: torch.Tensor  # [1, L]; M-RoPE [3, 1, L]
    labels: torch.Tensor  # [1, L] target predicted at each position, -100 where none
    seq_ids: torch.Tensor  # [1, L] chosen 2k / rejected 2k+1 (k = pair within the row), -1 elsewhere
    doc_ids: torch.Tensor  # [1, L] document within the row
    branch_ids: torch.Tensor  # [1, L] SHARED / CHOSEN / REJECTED
    cu_seqlens: torch.Tensor  # [documents + 1] int32
    pixel_values: torch.Tensor | None  # [tiles, ...]
    pair_index: torch.Tensor  # [pairs] data-stream index of the row's k-th pair
    layout: str
    image_grid_thw: torch.Tensor | None = None  # [images, 3] (Qwen-VL)

    @property
    def num_pairs(self) -> int:
        return self.pair_index.numel()

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device, dtype=None) -> PackedBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        if self.pixel_values is not None and dtype is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return PackedBatch(**moved)


class _Row:
    def __init__(self):
        self.ids, self.pos, self.labels, self.seq, self.doc, self.branch = [], [], [], [], [], []
        self.bounds = [0]

    def add(self, ids, pos, labels, seq, branch):
        self.ids += ids
        self.pos.append(pos)
        self.labels += labels
        self.seq += seq
        self.branch += branch
        self.doc += [len(self.bounds) - 1] * len(ids)

    def end_document(self):
        self.bounds.append(len(self.ids))


def _branch(context_len: int, response: list[int], tag: int) -> tuple[list, list]:
    """Labels and seq ids of [context | response[:-1]] with response scored from the context's last token."""
    labels = [IGNORE] * (context_len - 1) + list(response)
    seq = [-1] * (context_len - 1) + [tag] * len(response)
    return labels, seq


def arange_positions(ids: list[int], grid) -> torch.Tensor:
    return torch.arange(len(ids))[None]


def as_position_ids(positions: torch.Tensor) -> torch.Tensor:
    """[rows, L] -> what the model takes: [1, L], or [rows, 1, L] for M-RoPE."""
    return positions if positions.shape[0] == 1 else positions[:, None]


def with_document(batch: PackedBatch, ids: list[int], positions: torch.Tensor, **replaced) -> PackedBatch:
    """`batch` with one more document at its end that nothing is scored on: its tokens attend only
    to each other, carry no target and belong to no sequence. positions: [rows, len(ids)];
    `replaced`: fields that change with it (the row's images)."""
    device, n = batch.input_ids.device, len(ids)

    def extend(t, values):
        return torch.cat([t, values.to(device=device, dtype=t.dtype).view(1, -1)], dim=1)

    ones = torch.ones(n, dtype=torch.long)
    return dataclasses.replace(
        batch,
        input_ids=extend(batch.input_ids, torch.tensor(ids)),
        position_ids=torch.cat([batch.position_ids, as_position_ids(positions).to(device)], dim=-1),
        labels=extend(batch.labels, ones * IGNORE),
        seq_ids=extend(batch.seq_ids, -ones),
        doc_ids=extend(batch.doc_ids, ones * (len(batch.cu_seqlens) - 1)),
        branch_ids=extend(batch.branch_ids, ones * SHARED),
        cu_seqlens=torch.cat([batch.cu_seqlens, batch.cu_seqlens[-1:] + n]),
        **replaced,
    )


def pack_row(pairs: list[RenderedPair], layout: str, positions=arange_positions) -> PackedBatch:
    """One packed row from rendered pairs (in the given order). positions(ids, image_grid_thw) ->
    [rows, len(ids)]: the position ids of a document run alone (the model family's)."""
    if layout not in LAYOUTS:
        raise ValueError(f"packing layout must be one of {LAYOUTS}, got {layout!r}")
    if not pairs:
        raise ValueError("a packed row needs at least one pair")
    row, pixels, grids = _Row(), [], []
    for k, p in enumerate(pairs):
        P, prompt = len(p.prompt_ids), p.prompt_ids
        c_in, r_in = p.chosen_ids[:-1], p.rejected_ids[:-1]
        c_pos, r_pos = positions(prompt + c_in, p.image_grid_thw), positions(prompt + r_in, p.image_grid_thw)
        copies = 1 if layout == "prefix" else 2  # the images go with each document
        if p.pixel_values is not None:
            pixels += [p.pixel_values] * copies
        if p.image_grid_thw is not None:
            grids += [p.image_grid_thw] * copies
        if layout == "prefix":
            # the rejected branch continues from the prompt's end as prompt + rejected alone would
            row.add(prompt[:-1], c_pos[:, :P - 1], [IGNORE] * (P - 1), [-1] * (P - 1), [SHARED] * (P - 1))
            for resp, inputs, pos, tag, branch in ((p.chosen_ids, c_in, c_pos, 2 * k, CHOSEN),
                                                   (p.rejected_ids, r_in, r_pos, 2 * k + 1, REJECTED)):
                labels, seq = _branch(1, resp, tag)
                row.add([prompt[-1]] + inputs, pos[:, P - 1:], labels, seq, [branch] * (1 + len(inputs)))
            row.end_document()
        else:
            for resp, inputs, pos, tag in ((p.chosen_ids, c_in, c_pos, 2 * k),
                                           (p.rejected_ids, r_in, r_pos, 2 * k + 1)):
                labels, seq = _branch(P, resp, tag)
                row.add(prompt + inputs, pos, labels, seq, [SHARED] * (P + len(inputs)))
                row.end_document()
    as_row = lambda x: torch.tensor(x, dtype=torch.long)[None]
    return PackedBatch(
        input_ids=as_row(row.ids), position_ids=as_position_ids(torch.cat(row.pos, dim=1)), labels=as_row(row.labels),
        seq_ids=as_row(row.seq), doc_ids=as_row(row.doc), branch_ids=as_row(row.branch),
        cu_seqlens=torch.tensor(row.bounds, dtype=torch.int32),
        pixel_values=torch.cat(pixels) if pixels else None,
        pair_index=torch.tensor([p.index for p in pairs], dtype=torch.long), layout=layout,
        image_grid_thw=torch.cat(grids) if grids else None,
    )
