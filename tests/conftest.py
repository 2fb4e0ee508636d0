"""Test setup: without CUDA the Triton kernels run on Triton's CPU interpreter.

TRITON_INTERPRET must be set before `mpo.kernels` is imported (Triton fixes the mode when a kernel
is decorated), hence here, before any test module imports mpo. With CUDA the same tests run the
compiled kernels on the GPU.

Every test starts from a fresh random seed (Python, NumPy and torch's global generators), printed
with its failure; MPO_TEST_SEED=<seed> replays it.
"""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The slow tier runs one worker per core: one thread each, for the worker and the processes its tests
    # start (torchrun already gives each rank one). More threads than cores leave PyTorch's OpenMP threads
    # waiting on each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# The slow tier's longest tests (minutes each on 2 cores), started first: with the tier on two
# workers (`-n 2`), whatever starts last decides when both are done.
LONGEST = ("test_demo_learns", "test_bench_train_cpu_smoke", "test_real_lm_correctness_pairs_then_train",
           "test_killed_and_resumed_run_ends_bit_identical[3-4]", "test_two_ranks_splitting_each_row_match_one_rank")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((k for k, name in enumerate(LONGEST) if item.name.startswith(name)), len(LONGEST))

    items.sort(key=rank)  # stable: the others keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def random_seed(request):
    value = int(os.environ.get("MPO_TEST_SEED") or int.from_bytes(os.urandom(4), "little") % 2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and "seed" in dict(item.user_properties):
        report.sections.append(("random seed", f"replay with MPO_TEST_SEED={dict(item.user_properties)['seed']} "
                                               f"python -m pytest '{item.nodeid}'"))


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled float tensors (and -7 for integers), so an
    output element a kernel forgets to write shows up as NaN instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny model folders built locally once per session: {"internvl" | "qwen2" | "llama": Path}."""
    from transformers.utils import logging

    from mpo.models.tiny import ARCHS, build_tiny_model

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo preference set in MMPR format (27 train, 9 held-out pairs)."""
    from mpo.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", train=27, heldout=9)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone (synced generate, ZeRO-3 partitioning at load)."""
    import torch.distributed as dist

    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    if mine and dist.is_initialized():  # an in-process `mpo` command ends the group it finds
        dist.destroy_process_group()
