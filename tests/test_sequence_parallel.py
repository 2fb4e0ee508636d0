"""Sequence parallelism (train.sequence_parallel_size, DeepSpeed Ulysses) on gloo: each packed row
split over 2 ranks gives the unsplit row's per-pair sums, losses and gradients (a text model, and
InternVL, Qwen2.5-VL and InternVL on GPT-OSS, attention sinks and sliding windows, on the demo's
image pairs); the ranks of a group share a row's images; 2 data x 2 sequence parallel ranks follow
the one-rank run; what cannot work is refused with the reason."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from commands import env, free_port, mpo, rows, write_config
from safetensors.torch import load_file

from mpo.distributed import Dist
from mpo.train.config import load_config
from mpo.train.engine import enable_sequence_parallel

# tokens per packed row, whatever the ranks sharing it
ROWS = {"llama": 128, "internvl": 512, "qwen2_5_vl": 512, "internvl_gpt_oss": 512}

GRADIENTS = """
import sys, deepspeed
from safetensors.torch import save_file
from mpo.distributed import end_process
from mpo.train.config import load_config
from mpo.train.trainer import Trainer
t = Trainer(load_config(sys.argv[1], sys.argv[4:]), sys.argv[2])
pairs, dealt = t.plan.rows(0, t.data_world)
batches, rounds = t.train_batches(0), max(len(rows) for rows in dealt)
for k in range(rounds):
    batch = next(batches).to(t.dist.device, t.dtype)
    t.forward_backward(batch, pair_count=len(pairs), chosen_tokens=t.train_pairs.chosen_tokens(pairs),
                       last=k == rounds - 1)
grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in t.engine.module.named_parameters()
         if p.requires_grad}
if t.dist.main:
    save_file(grads, sys.argv[3])
end_process(0)
"""


def text_pairs(path, n=24):
    """Pairs of uneven lengths: rows of several pairs, responses long enough to straddle a row's middle."""
    rows = []
    for i in range(n):
        steps = " ".join(f"{i} plus {k} is {i + k}." for k in range(1 + i % 5))
        rows.append({"prompt": f"Count on from {i} in steps of one, saying each sum.", "chosen": steps,
                     "rejected": f"I think it is {i * 7 % 11}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sp_config(tmp_path, tiny_models, name, sp, arch="llama", demo_data=None):
    """The text model on text pairs, or a vision-language model on the demo's image pairs."""
    data = {"train": str(text_pairs(tmp_path / "text.jsonl")), "eval": ""} if arch == "llama" else {}
    return write_config(tmp_path / f"{name}.yaml", tiny_models[arch], demo_data or tmp_path,
                        data={**data, "index_dir": str(tmp_path / "index")},
                        train={"max_tokens_per_row": ROWS[arch] // sp, "sequence_parallel_size": sp, "max_steps": 3,
                               "global_batch_pairs": 12},
                        checkpoint={"export_final": False})


def straddling(run, row_tokens) -> int:
    """Pairs of the reference pass whose chosen or rejected response crosses the middle of its row."""
    from mpo.data.dataset import PairDataset
    from mpo.data.packing import PackingOptions
    from mpo.data.records import Rejects

    cfg = load_config(run / "config.yaml")
    pairs = PairDataset.open(cfg.model.path, cfg.data.train, PackingOptions("prefix", row_tokens, "truncate"),
                             Rejects(), index_dir=cfg.data.index_dir)
    found = 0
    for row in pairs.data_order_rows():
        seq = pairs[row].seq_ids[0]
        mid = (seq.numel() + 1) // 2  # the first token of the second shard (rows are padded to even lengths)
        found += int(seq[mid - 1] >= 0 and seq[mid - 1] == seq[mid])
    return found


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "internvl", "qwen2_5_vl", "internvl_gpt_oss"])
def test_two_ranks_splitting_each_row_match_one_rank(tmp_path, tiny_models, demo_data, arch):
    """Reference sums (the cache) within 1e-5 of the unsplit rows', with responses straddling the
    shard boundary; losses, reward shift and held-out metrics within 1e-3 step for step; every
    gradient (InternVL's vision tower's, GPT-OSS's attention sinks, each rank attending half the
    heads) within 1e-4."""
    one = sp_config(tmp_path, tiny_models, "one", 1, arch, demo_data)
    two = sp_config(tmp_path, tiny_models, "two", 2, arch, demo_data)
    mpo("train", one, "--output-dir", tmp_path / "one")
    mpo("train", two, "--output-dir", tmp_path / "two", ranks=2)
    assert straddling(tmp_path / "two", ROWS[arch]) >= 1
    a, b = (load_file(str(tmp_path / run / "reference_logps.safetensors")) for run in ("one", "two"))
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
    for key in ("chosen_tokens", "rejected_tokens", "fingerprint"):
        assert torch.equal(a[key], b[key]), key
    for x, y in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        assert x["pairs"] == y["pairs"] and x["row_tokens"] == y["row_tokens"]
        for key in ("loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/margins", "reward_shift"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-6), (x["step"], key)
    for x, y in zip(rows(tmp_path / "one", "eval"), rows(tmp_path / "two", "eval"), strict=True):
        for key in ("loss", "rewards/accuracies", "rewards/margins"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-6), (x["step"], key)
    if arch == "qwen2_5_vl":
        return  # its gradients go the way InternVL's do (the same hook; its M-RoPE rows are in the sums above)
    grads, script = {}, tmp_path / "gradients.py"
    script.write_text(GRADIENTS)
    # the runs' pair index and reference cache serve the gradient runs too
    cache = f"loss.reference_cache={tmp_path / 'one' / 'reference_logps.safetensors'}"
    for name, config, ranks in (("one", one, 1), ("two", two, 2)):
        launch = [sys.executable, str(script)] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
            str(script)]
        out = tmp_path / f"{name}.grads.safetensors"
        proc = subprocess.run([*launch, str(config), str(tmp_path / f"g-{name}"), str(out), cache],
                              capture_output=True, text=True, env=env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        grads[name] = load_file(str(out))
    assert grads["one"].keys() == grads["two"].keys()
    # A key projection's bias has no gradient in exact arithmetic (softmax ignores a shift every key
    # shares): its float32 gradient is rounding noise, held to the model's whole gradient instead.
    floor = 1e-5 * torch.stack([g.norm() for g in grads["one"].values()]).norm()
    for name, g in grads["one"].items():
        error = (grads["two"][name] - g).norm() / torch.maximum(g.norm(), floor)
        assert error <= 1e-4, (name, float(error), float(g.norm()))


@pytest.mark.parametrize("ranks", [2, 3])
def test_the_ranks_of_a_group_share_the_rows_images(tiny_models, ranks):
    """Each rank encodes its share of the row's images (1 image: the other ranks none; 3 and 4 over 2 or
    3 ranks: uneven shares), and the gathered features and every gradient equal one process's, for each
    vision family (Qwen3-VL's deepstack features included)."""
    archs = ("internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl_moe", "gemma3")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                           f"--master-port={free_port()}", str(Path(__file__).with_name("images_shared_ranks.py")),
                           *(str(tiny_models[a]) for a in archs)], capture_output=True, text=True, env=env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert proc.stdout.count("ok ") == 3 * len(archs), proc.stdout


@pytest.mark.slow
def test_two_data_by_two_sequence_parallel_ranks_match_one_rank(tmp_path, tiny_models, demo_data):
    mpo("train", sp_config(tmp_path, tiny_models, "one", 1, "internvl", demo_data), "--output-dir", tmp_path / "one")
    mpo("train", sp_config(tmp_path, tiny_models, "four", 2, "internvl", demo_data), "--output-dir", tmp_path / "four",
        ranks=4)
    for x, y in zip(rows(tmp_path / "one"), rows(tmp_path / "four"), strict=True):
        assert x["pairs"] == y["pairs"] and x["row_tokens"] == y["row_tokens"]
        for key in ("loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "reward_shift"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-6), (x["step"], key)


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.zero_stage=2"], r"needs deepspeed.zero_stage 3"),
    (["train.sequence_parallel_size=3"], r"has 4 attention heads and 2 key/value heads"),
])
def test_what_cannot_split_is_refused_with_the_reason(tmp_path, tiny_models, overrides, message):
    config = sp_config(tmp_path, tiny_models, "c", 2)
    cfg = load_config(config, overrides)
    with pytest.raises(ValueError, match=message):
        enable_sequence_parallel(cfg, Dist(0, 6, 0, torch.device("cpu")))
