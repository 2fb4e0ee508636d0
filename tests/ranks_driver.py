"""Runs under torchrun for tests/test_ranks.py: `python tests/ranks_driver.py CASE FAIL_RANK ARGS...`.

FAIL_RANK (-1: none) raises "injected failure on rank R" at one point of CASE, the rest is the real
code: `index OUT MODEL DATA` builds a pair index with every rank (chunks of 3 pairs, so each rank
measures some); `mpo PATCH ARGS...` runs `mpo ARGS...` with the function PATCH ("module:Class.attr"
or "module:attr") failing on FAIL_RANK. Each case ends as the mpo command does (`mpo.cli.run`).
"""

import importlib
import os
import sys
import time

rank, case, fail = int(os.environ["RANK"]), sys.argv[1], int(sys.argv[2])


def injected(*args, **kwargs):
    print(f"failing at {time.time()}", flush=True)
    raise RuntimeError(f"injected failure on rank {rank}")


def patch(target: str) -> None:
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    setattr(owner, attr, injected)


if case == "index":
    from pathlib import Path

    import torch
    import torch.distributed as dist

    import mpo.data.index
    from mpo.data.dataset import PairDataset
    from mpo.data.packing import PackingOptions
    from mpo.data.records import Rejects
    from mpo.distributed import Dist, Phase, end_process

    out, model, data = map(Path, sys.argv[3:6])
    mpo.data.index.CHUNK = 3
    if rank == fail:
        patch("mpo.data.index:_measure")
    dist.init_process_group("gloo")
    rejects = Rejects(out / "rejects.jsonl" if rank == 0 else None)
    with Phase(Dist(rank, dist.get_world_size(), 0, torch.device("cpu")), "indexing") as phase:
        PairDataset.open(model, data, PackingOptions("prefix", 4096, "truncate"), rejects, index_dir=out,
                         group=phase)
    rejects.close()
    end_process(0)  # as the mpo command ends
elif case == "mpo":
    from mpo.cli import run

    if rank == fail:
        patch(sys.argv[3])
    sys.argv = ["mpo", *sys.argv[4:]]
    run()
