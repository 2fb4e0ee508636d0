"""The loop the pair builders and `mpo eval` share: shard over ranks, skip what is done, record, merge.

Under a launcher each rank takes prompts k with k % world == rank and writes its own result file;
when every rank is done, rank 0 writes the output (the MMPR folder, or the evaluation report).
The whole run is one `mpo.distributed.Phase`: ranks meet without a time limit (one rank may finish
its slice hours before another) and a rank that fails ends the others with its message. Without a
launcher it is one rank. See `mpo.pairs.output` for the files and how a rerun resumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mpo.atomic import write_text_atomic
from mpo.distributed import Dist, Phase
from mpo.generation.prompts import PromptRecord
from mpo.pairs.output import ResultLog, write_mmpr


def run_prompts(records: list[PromptRecord], out_dir: str | Path, *, dist: Dist,
                process: Callable[[list[PromptRecord]], list[dict]], chunk: int, desc: str, settings: dict,
                progress: bool = True) -> None:
    """Run `process` over this rank's unfinished prompts, `chunk` at a time, each result appended to
    OUT/work as it is made. `settings` (builder, model, input, sampling options) must match those of
    the results already in OUT: finished prompts are only skipped when they were made the same way."""
    from tqdm import tqdm

    check_settings(Path(out_dir), settings)
    log = ResultLog(out_dir, dist.rank)
    try:
        mine = [r for k, r in enumerate(records) if k % dist.world == dist.rank and r.id not in log.finished]
        with tqdm(total=len(mine), desc=desc, unit="prompt", disable=not progress or dist.rank != 0) as bar:
            for lo in range(0, len(mine), chunk):
                for result in process(mine[lo:lo + chunk]):
                    log.append(result)
                bar.update(len(mine[lo:lo + chunk]))
    finally:
        log.close()


def written_by_rank0(phase: Phase, write: Callable[[], dict]):
    """`write()`'s value on rank 0 once every rank has finished its prompts; None on the others."""
    phase.sync()
    return write() if phase.dist.main else None


def build(records: list[PromptRecord], out_dir: str | Path, *, name: str, image_root: Path, dist: Dist,
          process: Callable[[list[PromptRecord]], list[dict]], chunk: int, desc: str, settings: dict,
          images: str = "link", progress: bool = True) -> dict | None:
    """The pair builders' run: `run_prompts`, then rank 0 writes the MMPR folder -> counts (rank 0)."""
    with Phase(dist, desc) as phase:
        run_prompts(records, out_dir, dist=dist, process=process, chunk=chunk, desc=desc,
                    settings={"name": name, **settings}, progress=progress)
        return written_by_rank0(phase, lambda: write_mmpr(out_dir, name, [r.id for r in records], image_root,
                                                          images=images))


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
