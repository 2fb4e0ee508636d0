"""The loop the pair builders and `mpo eval` share: shard over ranks, skip what is done, record, merge.

Under `torchrun` each rank takes prompts k with k % world == rank and writes its own result file;
after a barrier (gloo: it is the only collective needed) rank 0 writes the output (the MMPR folder,
or the evaluation report). Without a launcher it is one rank. See `mpo.pairs.output` for the files
and how a rerun resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from mpo.atomic import write_text_atomic
from mpo.pairs.output import ResultLog, write_mmpr
from mpo.pairs.prompts import PromptRecord


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @classmethod
    def init(cls, device: str = "auto") -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            # only barriers: one rank may finish its slice (or rank 0 its merge) hours before another
            torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))
        rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if cuda and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(rank, world, torch.device("cuda", local) if cuda else torch.device("cpu"))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def run_prompts(records: list[PromptRecord], out_dir: str | Path, *, ranks: Ranks,
                process: Callable[[list[PromptRecord]], list[dict]], chunk: int, desc: str, settings: dict,
                progress: bool = True) -> None:
    """Run `process` over this rank's unfinished prompts, `chunk` at a time, each result appended to
    OUT/work as it is made. `settings` (builder, model, input, sampling options) must match those of
    the results already in OUT: finished prompts are only skipped when they were made the same way."""
    from tqdm import tqdm

    check_settings(Path(out_dir), settings)
    log = ResultLog(out_dir, ranks.rank)
    try:
        mine = [r for k, r in enumerate(records) if k % ranks.world == ranks.rank and r.id not in log.finished]
        with tqdm(total=len(mine), desc=desc, unit="prompt", disable=not progress or ranks.rank != 0) as bar:
            for lo in range(0, len(mine), chunk):
                for result in process(mine[lo:lo + chunk]):
                    log.append(result)
                bar.update(len(mine[lo:lo + chunk]))
    finally:
        log.close()


def merged(ranks: Ranks, write: Callable[[], dict]):
    """`write()`'s value on rank 0 once every rank has finished its prompts; None on the others."""
    ranks.barrier()
    out = None
    try:
        if ranks.rank == 0:
            out = write()
    finally:  # the other ranks wait for the merge, whether it worked or not
        ranks.barrier()
    return out


def build(records: list[PromptRecord], out_dir: str | Path, *, name: str, image_root: Path, ranks: Ranks,
          process: Callable[[list[PromptRecord]], list[dict]], chunk: int, desc: str, settings: dict,
          images: str = "link", progress: bool = True) -> dict | None:
    """The pair builders' run: `run_prompts`, then rank 0 writes the MMPR folder -> counts (rank 0)."""
    run_prompts(records, out_dir, ranks=ranks, process=process, chunk=chunk, desc=desc,
                settings={"name": name, **settings}, progress=progress)
    return merged(ranks, lambda: write_mmpr(out_dir, name, [r.id for r in records], image_root, images=images))


def check_settings(out_dir: Path, settings: dict) -> None:
    """OUT/work/settings.json: written by the first run, compared by every later one."""
    path = out_dir / "work" / "settings.json"
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples -> lists)
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != settings:
            changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
            raise ValueError(f"{out_dir} holds results made with other settings ({', '.join(changed)} differ): "
                             "use another --out, or the same settings to resume")
        return
    write_text_atomic(path, json.dumps(settings, indent=2) + "\n")
