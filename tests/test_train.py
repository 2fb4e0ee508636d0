"""The trainer end to end on the CPU (gloo), through the real `mpo train` command.

Runs use the tiny InternVL model and the small demo set, the PyTorch kernel path (the interpreter
would only slow them down; the kernels are tested elsewhere) and DeepSpeed.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from commands import env, free_port, launcher, mpo, rows, write_config
from safetensors.torch import load_file, save_file

# The slow tier, but for one 2-rank ZeRO-3 run and one kill-and-resume, kept in the fast tier.
SLOW = pytest.mark.slow


def mixed_data(tmp_path, demo_data):
    """The demo's training pairs, every other one without its image: text-only rows and pairs
    beside image ones (rows without images run the vision tower on a blank image)."""
    meta = json.loads((demo_data / "meta.json").read_text())
    lines = []
    for entry in meta.values():
        lines += (demo_data / entry["annotation"]).read_text().splitlines()
    mixed = []
    for k, line in enumerate(lines):
        record = json.loads(line)
        if k % 2:
            record.pop("image")
            record["question"] = record["question"].replace("<image>\n", "")
        mixed.append(json.dumps(record))
    (tmp_path / "mixed.jsonl").write_text("\n".join(mixed) + "\n")
    meta_file = tmp_path / "mixed.json"
    meta_file.write_text(json.dumps({"mixed": {"root": str(demo_data), "annotation": str(tmp_path / "mixed.jsonl"),
                                               "repeat_time": 1}}))
    return meta_file


def eval_prompts(tmp_path, demo_data, n):
    """n questions with images (copied beside the file: inside its image root), for data.eval_prompts."""
    lines = (demo_data / "annotations" / "count_train.jsonl").read_text().splitlines()[:n]
    records = list(map(json.loads, lines))
    for r in records:
        (tmp_path / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_data / r["image"], tmp_path / r["image"])
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("question", "answer", "image")}) + "\n" for r in records))
    return path


def generations(run_dir, step):
    return [json.loads(x) for x in (run_dir / "generations" / f"step-{step}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["internvl", pytest.param("qwen2_5_vl", marks=SLOW)])
def test_two_ranks_match_one_rank_under_zero3(tmp_path, tiny_models, demo_data, arch):
    """Same global batch: the same losses step for step (ZeRO-3, gloo), whatever the split, with
    image and text-only pairs mixed; held-out questions answered during training (an odd count: one
    rank's share is padded) come out the same before training."""
    config = write_config(tmp_path / "c.yaml", tiny_models[arch], demo_data,
                          data={"train": str(mixed_data(tmp_path, demo_data)),
                                "eval_prompts": str(eval_prompts(tmp_path, demo_data, 5))},
                          train={"eval_generation_every": 2, "eval_max_new_tokens": 5, "eval_batch_size": 1})
    mpo("train", config, "--output-dir", tmp_path / "one", "checkpoint.export_final=false")
    mpo("train", config, "--output-dir", tmp_path / "two", "checkpoint.export_final=false", ranks=2)
    for run in ("one", "two"):
        evals = rows(tmp_path / run, "eval")
        assert [r["step"] for r in evals] == [0, 2, 4]
        assert all(r["questions"] == 5 and 0 <= r["accuracy"] <= r["with_trigger"] <= 1 for r in evals), evals
        for step in (0, 2, 4):
            assert [g["id"] for g in generations(tmp_path / run, step)] == ["1", "2", "3", "4", "5"]
    assert generations(tmp_path / "one", 0) == generations(tmp_path / "two", 0)
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a["pairs"] == b["pairs"]
        for key in ("loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (a["step"], key)
        assert a["reward_shift"] == pytest.approx(b["reward_shift"], rel=1e-3, abs=1e-7)
        assert "data_wait_s/max" not in a and b["data_wait_s"] <= b["data_wait_s/max"] <= b["step_s"]
    evals = rows(tmp_path / "one", "eval"), rows(tmp_path / "two", "eval")
    assert evals[0][-1]["loss"] == pytest.approx(evals[1][-1]["loss"], rel=1e-3)


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, state)} of every process."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return found


def kill_tree(root: int) -> None:
    """SIGKILL a launcher and every process under it at once (torchrun starts each rank in a session
    of its own, out of reach of the launcher's group), and wait until none is left alive (a zombie
    has closed its files, the run folder's lock included)."""
    tree, table = {root}, _processes()
    while grown := {pid for pid, (parent, _) in table.items() if parent in tree} - tree:
        tree |= grown
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 60
    while alive := [pid for pid, (_, state) in _processes().items() if pid in tree and state != "Z"]:
        assert time.time() < deadline, f"processes {alive} outlived SIGKILL by a minute"
        time.sleep(0.05)


def opened_by_thread(trace) -> dict[str, set[str]]:
    """strace -f output -> {thread id: names of the checkpoint files it opened}."""
    found: dict[str, set[str]] = {}
    for line in trace.read_text().splitlines():
        match = re.match(r'(\d+) +openat\(.*?"([^"]*/checkpoint-\d+/[^"]+)"', line)
        if match and "= -1" not in line:
            found.setdefault(match[1], set()).add(match[2].rsplit("/", 1)[1])
    return found


@pytest.mark.parametrize("stage,ranks", [pytest.param(3, 4, marks=SLOW), (0, 1)])
def test_killed_and_resumed_run_ends_bit_identical(tmp_path, tiny_models, demo_data, stage, ranks):
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, train={"max_steps": 6},
                          deepspeed={"zero_stage": stage}, checkpoint={"every_steps": 2, "keep_last": 3},
                          data={"eval": ""})
    mpo("train", config, "--output-dir", tmp_path / "whole", ranks=ranks)
    run = tmp_path / "killed"
    proc = subprocess.Popen([*launcher(ranks), "train", str(config), "--output-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True)
    deadline = time.time() + 600
    while not (run / "checkpoint-2").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    kill_tree(proc.pid)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "final").exists() and not (run / "checkpoint-6").exists()
    if ranks > 1:
        assert {p.name for p in (run / "checkpoint-2").glob("optimizer.*")} == {
            f"optimizer.rank{r}.{ext}" for r in range(ranks) for ext in ("json", "safetensors")}
    proc = mpo("train", config, "--output-dir", run, "--resume", "train.seed=5", check=False)
    assert proc.returncode == 1 and "the config differs from the one" in proc.stderr and "train.seed" in proc.stderr
    if ranks == 1:
        mpo("train", config, "--output-dir", run, "--resume")
    else:  # every process reads its own optimizer state alone (the files each one opens, traced)
        trace = tmp_path / "opened.txt"
        proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(trace), *launcher(ranks),
                               "train", str(config), "--output-dir", str(run), "--resume"],
                              capture_output=True, text=True, env=env(), timeout=900)
        assert proc.returncode == 0, proc.stderr[-6000:]
        readers = {}  # optimizer file -> the ranks (by their RNG file) of the threads that opened it
        for names in opened_by_thread(trace).values():
            rng = {n.split(".")[1] for n in names if n.startswith("rng.rank")}
            for n in names:
                if n.startswith("optimizer.rank"):
                    readers.setdefault(n, set()).update(rng or {"no rank"})
        assert readers == {f"optimizer.rank{r}.{ext}": {f"rank{r}"} for r in range(ranks)
                           for ext in ("json", "safetensors")}, readers
    assert [r["step"] for r in rows(run)] == list(range(1, 7))  # rows logged after the checkpoint: not twice
    whole, resumed = load_file(str(tmp_path / "whole" / "final" / "model.safetensors")), \
        load_file(str(run / "final" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    trainer = json.loads((run / "checkpoint-6" / "trainer.json").read_text())
    assert trainer["step"] == 6 and trainer["reward_shift"] == json.loads(
        (tmp_path / "whole" / "checkpoint-6" / "trainer.json").read_text())["reward_shift"]


@SLOW
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, tiny_models, demo_data):
    """Flipped bytes in tensor data or in a safetensors header, or a missing file: the resume stops before
    reading anything, naming the file and the checkpoint to fall back to."""
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, train={"max_steps": 2},
                          deepspeed={"zero_stage": 0}, checkpoint={"every_steps": 1, "export_final": False},
                          data={"eval": ""})
    run = tmp_path / "run"
    mpo("train", config, "--output-dir", run)
    ckpt = run / "checkpoint-2"
    assert json.loads((ckpt / "digests.json").read_text()).keys() == {
        p.name for p in ckpt.iterdir() if p.name != "digests.json"}
    for name, where in [("optimizer.rank0.safetensors", -3), ("model.safetensors", 12), ("rng.rank0.json", None)]:
        path = ckpt / name
        original = path.read_bytes()
        if where is None:
            path.unlink()
        else:
            damaged = bytearray(original)
            damaged[where] ^= 0x10
            path.write_bytes(bytes(damaged))
        proc = mpo("train", config, "--output-dir", run, "--resume", check=False)
        assert proc.returncode == 1, proc.stderr
        assert f"{path}: {'missing' if where is None else 'damaged'}" in proc.stderr, proc.stderr
        assert "move checkpoint-2 away to resume from checkpoint-1" in proc.stderr
        path.write_bytes(original)


@SLOW
def test_a_full_disk_or_an_unwritable_folder_is_one_line(tmp_path, tiny_models, demo_data):
    """A write that fails (here a file-size limit, as a full disk would) or an output folder that cannot be
    made: one line naming the path, no traceback."""
    import resource

    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, train={"max_steps": 1},
                          deepspeed={"zero_stage": 0}, data={"eval": ""})
    limit = 800 * 1024  # above the index and reference files, below a checkpoint's optimizer state
    proc = subprocess.run([sys.executable, "-m", "mpo", "train", str(config), "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env(), timeout=900,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"mpo train: error: cannot write {tmp_path / 'run'}/")
    (tmp_path / "a-file").write_text("")
    proc = mpo("train", config, "--output-dir", tmp_path / "a-file" / "run", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(f"Not a directory: '{tmp_path / 'a-file' / 'run'}'")


@SLOW
def test_cached_and_online_reference_give_the_same_losses(tmp_path, tiny_models, demo_data):
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, deepspeed={"zero_stage": 3},
                          checkpoint={"export_final": False})
    mpo("train", config, "--output-dir", tmp_path / "cache")
    mpo("train", config, "--output-dir", tmp_path / "online", "loss.reference=online")
    assert (tmp_path / "cache" / "reference_logps.safetensors").is_file()
    assert not (tmp_path / "online" / "reference_logps.safetensors").exists()
    for a, b in zip(rows(tmp_path / "cache"), rows(tmp_path / "online")):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "loss/bco_pair"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


@SLOW
@pytest.mark.parametrize("arch", ["internvl", "qwen2_5_vl", "qwen3_vl", "llama"])
def test_final_export_loads_with_from_pretrained(tmp_path, tiny_models, demo_data, arch):
    """final/ loads with the family's Auto class, with no missing or unexpected key, and holds the trained
    weights; the text model (Llama) also checks that no non-persistent rotary buffer is exported. The
    Qwen-VL runs freeze the vision tower: its weights come back unchanged."""
    from transformers import AutoConfig, AutoTokenizer

    from mpo.families import family_of

    auto = family_of(AutoConfig.from_pretrained(tiny_models[arch])).auto_class()
    data, frozen = {}, arch.startswith("qwen")
    # InternVL: the vision tower at learning rate 0 (and so no weight decay either) stays as it was
    optim = {"vision_lr": 0.0} if arch == "internvl" else {}
    if arch == "llama":
        text = tmp_path / "text.jsonl"
        text.write_text("".join(json.dumps({"prompt": f"Is {i} even?", "chosen": ["no", "yes"][i % 2 == 0],
                                            "rejected": ["yes", "no"][i % 2 == 0]}) + "\n" for i in range(16)))
        data = {"train": str(text), "eval": ""}
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, train={"max_steps": 2},
                          model={"path": str(tiny_models[arch]), "freeze_vision": frozen}, data=data,
                          optim=optim)
    printed = mpo("train", config, "--output-dir", tmp_path / "run").stderr
    assert f"mpo train: {tiny_models[arch]}" in printed and "peak lr language 0.001" in printed
    assert arch != "internvl" or "vision 0, projector 0.001" in printed
    final = tmp_path / "run" / "final"
    model, loading = auto.from_pretrained(final, output_loading_info=True)
    assert not any(loading.values()), loading
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template
    assert arch == "llama" or (final / "processor_config.json").is_file()
    original = auto.from_pretrained(tiny_models[arch])
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), original.named_parameters())
               if not torch.equal(p, q)]
    assert changed, "training changed no weight"
    assert not frozen or not [n for n in changed if ".visual." in n and "merger" not in n], changed
    if arch == "internvl":
        assert not [n for n in changed if "vision_tower" in n], changed
        assert [n for n in changed if "multi_modal_projector" in n], changed
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 2
    assert {"step", "split", "loss", "rewards/accuracies", "reward_shift", "pairs/s", "tokens/s/gpu",
            "peak_memory_gb", "lr"} <= set(rows(tmp_path / "run")[-1])


NAN_DRIVER = """
import json, sys, torch
from mpo.models.fused_head import PolicyWithLoss
from mpo.train.config import load_config
from mpo.train.trainer import Trainer
bad_steps = set(json.loads(sys.argv[3]))
forward = PolicyWithLoss.forward
state = {"step": 0}
def poisoned(self, *a, **k):
    loss, metrics = forward(self, *a, **k)
    return (loss * float("nan") if state["step"] in bad_steps else loss), metrics
PolicyWithLoss.forward = poisoned
t = Trainer(load_config(sys.argv[1]), sys.argv[2])
p = next(p for p in t.engine.module.parameters() if p.requires_grad and p.ndim == 2)
out = []
batches = t.train_batches(0)
for step in range(4):
    state["step"] = step
    before = p.detach().clone()
    m = t.train_step(step, batches)
    out.append([m["step_applied"], bool(torch.equal(before, p.detach()))])
print(json.dumps(out))
"""


@SLOW
def test_answers_during_training_are_those_of_mpo_eval_on_the_saved_model(tmp_path, tiny_models, demo_data):
    """The last generation evaluation runs on the weights final/ holds: `mpo eval` on final/ gives the
    same responses, verdicts and accuracy. Answering leaves training as it was (packed attention back
    in place, random state untouched): the same losses as without it."""
    questions = eval_prompts(tmp_path, demo_data, 3)
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, deepspeed={"zero_stage": 0},
                          data={"eval_prompts": str(questions)},
                          train={"max_steps": 2, "eval_max_new_tokens": 6, "eval_batch_size": 1,
                                 "eval_generation_every": 1})
    mpo("train", config, "--output-dir", tmp_path / "run")
    train_rows = rows(tmp_path / "run")
    assert [r["step"] for r in train_rows] == [1, 2] and all(r["step_applied"] for r in train_rows)
    evals = rows(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [0, 1, 2] and all("rewards/accuracies" in r for r in evals[::2])
    mpo("eval", "--model", tmp_path / "run" / "final", "--prompts", questions, "--out", tmp_path / "eval",
        "--max-new-tokens", 6, "--batch-size", 1)
    items = [json.loads(x) for x in (tmp_path / "eval" / "items.jsonl").read_text().splitlines()]
    during = generations(tmp_path / "run", 2)
    assert [g["response"] for g in during] == [i["responses"][0] for i in items]
    assert [g["verdict"] for g in during] == [i["verdicts"][0] for i in items]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evals[-1]["accuracy"] == report["accuracy"] and evals[-1]["truncated"] == report["truncated"]
    mpo("train", config, "--output-dir", tmp_path / "plain", "data.eval_prompts=", "checkpoint.export_final=false")
    assert [r["loss"] for r in rows(tmp_path / "plain")] == [r["loss"] for r in train_rows]


@SLOW
def test_non_finite_steps_are_skipped_not_applied(tmp_path, tiny_models, demo_data):
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, deepspeed={"zero_stage": 0},
                          data={"eval": ""})
    proc = subprocess.run([sys.executable, "-c", NAN_DRIVER, str(config), str(tmp_path / "run"), "[1, 2]"],
                          capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert steps == [[True, False], [False, True], [False, True], [True, False]]


LEAK_DRIVER = """
import hashlib, json, sys, torch
from mpo.models.fused_head import PolicyWithLoss
from mpo.train.config import load_config
from mpo.train.trainer import Trainer
poison, steps = json.loads(sys.argv[3]), json.loads(sys.argv[4])
forward, state = PolicyWithLoss.forward, {"step": -1, "micro": 0}
def poisoned(self, *a, **k):
    loss, metrics = forward(self, *a, **k)
    bad = state["micro"] in poison.get(str(state["step"]), [])
    state["micro"] += 1
    return (loss * float("nan") if bad else loss), metrics
PolicyWithLoss.forward = poisoned
t = Trainer(load_config(sys.argv[1]), sys.argv[2])
applied = []
batches = t.train_batches(steps[0])
for step in steps:
    state.update(step=step, micro=0)
    applied.append(t.train_step(step, batches)["step_applied"])
    assert state["micro"] >= 2, "the step needs several micro-batches"
h = hashlib.sha256()
for p in t.engine.module.parameters():
    h.update(p.detach().float().numpy().tobytes())
print(json.dumps([applied, h.hexdigest()]))
"""


@SLOW
@pytest.mark.parametrize("stage", [0, 2])
def test_a_skipped_step_leaves_nothing_behind(tmp_path, tiny_models, demo_data, stage):
    """Step 0 goes bad in its second micro-batch, after the first one's backward: the next step must
    update the weights exactly as if step 0 had never run (no gradient of it kept anywhere)."""
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, deepspeed={"zero_stage": stage},
                          data={"eval": ""}, train={"max_tokens_per_row": 256})

    def drive(run, poison, steps):
        proc = subprocess.run([sys.executable, "-c", LEAK_DRIVER, str(config), str(tmp_path / run), json.dumps(poison),
                               json.dumps(steps)], capture_output=True, text=True, env=env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    skipped = drive("a", {"0": [1]}, [0, 1])
    clean = drive("b", {}, [1])
    assert skipped[0] == [False, True] and clean[0] == [True]
    assert skipped[1] == clean[1]


@SLOW
def test_too_many_skipped_steps_stop_the_run(tmp_path, tiny_models, demo_data):
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, deepspeed={"zero_stage": 0},
                          data={"eval": ""}, optim={"lr": 1e30, "max_skipped_steps": 2})
    proc = mpo("train", config, "--output-dir", tmp_path / "run", check=False)
    assert proc.returncode != 0 and "consecutive steps had a non-finite loss or gradient" in proc.stderr


@SLOW
def test_clear_errors(tmp_path, tiny_models, demo_data):
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data)
    proc = mpo("train", config, "train.typo=1", check=False)
    assert proc.returncode == 1 and "unknown config key 'train.typo'" in proc.stderr
    proc = mpo("train", config, f"model.path={tmp_path / 'no-model'}", "--output-dir", tmp_path / "r1", check=False)
    assert proc.returncode == 1 and "model folder not found" in proc.stderr
    # a reference cache made for other data is refused
    cache = tmp_path / "ref.safetensors"
    mpo("ref-logps", config, f"loss.reference_cache={cache}", "--output-dir", tmp_path / "r2")
    assert cache.is_file()
    changed = tmp_path / "data.jsonl"
    lines = (demo_data / "annotations" / "count_train.jsonl").read_text().splitlines()
    changed.write_text("\n".join(json.dumps({**json.loads(x), "image": str(demo_data / json.loads(x)["image"])})
                                 for x in lines) + "\n")
    proc = mpo("train", config, f"loss.reference_cache={cache}", f"data.train={changed}",
               f"data.image_root={demo_data}", "--output-dir", tmp_path / "r3", check=False)
    assert proc.returncode == 1 and "does not match this run: the data changed" in proc.stderr
    proc = mpo("train", config, "--output-dir", tmp_path / "r4", "--resume", check=False)
    assert proc.returncode == 1 and "no checkpoint" in proc.stderr


@SLOW
def test_plot(tmp_path):
    from mpo.cli import main

    run = tmp_path / "run"
    run.mkdir()
    rows_ = [{"step": s, "split": "train", "loss": 1 / s, "rewards/accuracies": s / 10, "lr": 1e-3}
             for s in range(1, 6)]
    rows_.append({"step": 5, "split": "eval", "loss": 0.3, "rewards/accuracies": 0.7})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    assert main(["plot", str(run)]) == 0
    assert (run / "metrics.png").stat().st_size > 1000


@SLOW
def test_demo_learns(tmp_path):
    """`mpo train` with no config: both demo stages, then held-out reward accuracy of at least 0.9."""
    proc = subprocess.run([sys.executable, "-m", "mpo", "train", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env={**env(), "MPO_CACHE": str(tmp_path / "cache")},
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    evals = rows(tmp_path / "run", "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 400
    assert evals[-1]["rewards/accuracies"] >= 0.9, evals[-1]
    assert evals[-1]["rewards/accuracies"] > evals[0]["rewards/accuracies"]
    assert "held-out reward accuracy" in proc.stdout and str(tmp_path / "run") in proc.stdout
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@SLOW
def test_loader_workers_change_nothing(tmp_path, tiny_models, demo_data):
    """Rows rendered in 2 worker processes or in the training process: bitwise-equal metrics; the
    index built once serves the second run (data.index_dir)."""
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, deepspeed={"zero_stage": 0},
                          checkpoint={"export_final": False}, data={"index_dir": str(tmp_path / "index")})
    for workers in (0, 2):
        mpo("train", config, "--output-dir", tmp_path / f"w{workers}", f"data.num_workers={workers}")
    a, b = rows(tmp_path / "w0"), rows(tmp_path / "w2")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/chosen", "row_tokens"):
            assert x[key] == y[key], (x["step"], key)
        assert 0 <= x["data_wait_s"] <= x["step_s"]
    assert len(list((tmp_path / "index").glob("pairs-*.safetensors"))) == 2  # train and eval, built once


@SLOW
def test_a_run_that_never_trained_fails_and_exports_nothing(tmp_path, tiny_models, demo_data):
    """Every step skipped (a NaN in the tied embedding / LM head makes every loss non-finite): a non-zero exit,
    no final/; metrics.jsonl stays strict JSON (the non-finite loss is null); a half-written checkpoint left by a killed
    run is removed."""
    model = tmp_path / "nan-model"
    shutil.copytree(tiny_models["internvl"], model)
    weights = load_file(model / "model.safetensors")
    head = next(k for k in weights if k.endswith("embed_tokens.weight"))  # tied: the LM head too
    weights[head][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, model={"path": str(model)},
                          deepspeed={"zero_stage": 0}, data={"eval": ""}, optim={"max_skipped_steps": 100},
                          train={"max_steps": 3})
    (tmp_path / "run" / ".checkpoint-7.tmp").mkdir(parents=True)
    proc = mpo("train", config, "--output-dir", tmp_path / "run", check=False)
    assert proc.returncode != 0 and "nothing was trained, no final model exported" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / ".checkpoint-7.tmp").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]
    train = [r for r in parsed if r["split"] == "train"]
    assert [r["step_applied"] for r in train] == [False, False, False]
    assert all(r["loss"] is None for r in train)


@SLOW
@pytest.mark.parametrize("stage,ranks", [(0, 1), (3, 2)])
def test_lora_trains_only_adapters_and_exports_merged_and_adapter(tmp_path, tiny_models, demo_data, stage, ranks):
    """final/ is the base model plus alpha / r * B A in every adapted layer and nothing else changed
    (rebuilt here from final/adapter, and peft's own loader agrees); checkpoints hold the adapters
    only, well under a quarter of a full-weight checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, train={"max_steps": 3},
                          deepspeed={"zero_stage": stage}, lora={"r": 4, "alpha": 8.0},
                          checkpoint={"every_steps": 3}, data={"eval": ""})
    run = tmp_path / "run"
    mpo("train", config, "--output-dir", run, ranks=ranks)
    final, base_dir = run / "final", tiny_models["internvl"]
    model, loading = AutoModelForImageTextToText.from_pretrained(final, output_loading_info=True)
    assert not any(loading.values()), loading
    base = dict(AutoModelForImageTextToText.from_pretrained(base_dir).named_parameters())
    adapter = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    settings = json.loads((final / "adapter" / "adapter_config.json").read_text())
    scaling = settings["lora_alpha"] / settings["r"]
    adapted = 0
    for name, p in model.named_parameters():
        prefix = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{prefix}.lora_A.weight" in adapter:
            a, b = adapter[f"{prefix}.lora_A.weight"].double(), adapter[f"{prefix}.lora_B.weight"].double()
            assert b.abs().max() > 0, name  # B starts at 0: trained
            torch.testing.assert_close(p.double(), base[name].double() + scaling * b @ a, rtol=1e-6, atol=1e-6)
            adapted += 1
        else:
            assert torch.equal(p, base[name]), f"{name} changed without an adapter"
    assert adapted == 14  # q, k, v, o, gate, up, down in both language layers; nothing in the vision tower
    with_peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), final / "adapter")
    for name, p in with_peft.merge_and_unload().named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name], rtol=1e-5, atol=1e-6)
    full_weight = 3 * (base_dir / "model.safetensors").stat().st_size  # fp32 weights + AdamW's two moments
    stored = sum(f.stat().st_size for f in (run / "checkpoint-3").iterdir())
    assert stored < full_weight / 4, (stored, full_weight)


@SLOW
def test_lora_resumes_bit_identical(tmp_path, tiny_models, demo_data):
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data, train={"max_steps": 4},
                          deepspeed={"zero_stage": 0}, lora={"r": 4, "modules_to_save": ["multi_modal_projector"]},
                          checkpoint={"every_steps": 2, "keep_last": 2}, data={"eval": ""})
    mpo("train", config, "--output-dir", tmp_path / "whole")
    run = tmp_path / "resumed"
    mpo("train", config, "--output-dir", run)
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final")
    mpo("train", config, "--output-dir", run, "--resume")
    whole, resumed = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / "whole", run))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    projector = [k for k in whole if "multi_modal_projector" in k]
    original = load_file(str(tiny_models["internvl"] / "model.safetensors"))
    assert projector and any(not torch.equal(whole[k], original[k]) for k in projector)  # trained in full


ONLINE_DRIVER = """
import json, sys
import mpo.train.engine as engine, mpo.train.reference as reference
from mpo.train.config import load_config
from mpo.distributed import end_process
from mpo.train.trainer import Trainer
loads = []
def counted(load):
    def wrapper(path, **kwargs):
        loads.append(str(path))
        return load(path, **kwargs)
    return wrapper
engine.load_model, reference.load_model = counted(engine.load_model), counted(reference.load_model)
t = Trainer(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2])
t.run()
if t.dist.main:
    print(json.dumps({"loads": loads, "policy_is_reference": t.online.model is t.policy.model}))
end_process(0)
"""


@SLOW
@pytest.mark.parametrize("stage,ranks", [(0, 1), (3, 2)])
def test_lora_online_reference_is_the_policy_without_adapters(tmp_path, tiny_models, demo_data, stage, ranks):
    """loss.reference=online with LoRA loads no second model: the policy with its adapters disabled
    gives the reference sums, step for step those of the cache (built from a separately loaded base
    model). The rewards move away from 0 as the adapters train, so a reference that kept them on
    (the policy itself) would not match. (2 ranks: the ZeRO-3 case, each rank running the same
    forwards.)"""
    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data,
                          lora={"r": 4, "alpha": 8.0, "dropout": 0.1},
                          deepspeed={"zero_stage": stage}, checkpoint={"export_final": False})
    mpo("train", config, "--output-dir", tmp_path / "cache", ranks=ranks)
    driver = tmp_path / "driver.py"
    driver.write_text(ONLINE_DRIVER)
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  f"--nproc-per-node={ranks}", f"--master-port={free_port()}"]
    proc = subprocess.run([*launch, str(driver), str(config), str(tmp_path / "online"), "loss.reference=online"],
                          capture_output=True, text=True, env=env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"loads": [str(tiny_models["internvl"])], "policy_is_reference": True}
    assert not (tmp_path / "online" / "reference_logps.safetensors").exists()
    for split in ("train", "eval"):
        cache, online = rows(tmp_path / "cache", split), rows(tmp_path / "online", split)
        assert [r["step"] for r in cache] == [r["step"] for r in online] and cache
        for a, b in zip(cache, online):
            for key in ("loss", "loss/bco_pair", "rewards/chosen", "rewards/rejected", "logps/chosen"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (split, a["step"], key)
    assert abs(rows(tmp_path / "online", "eval")[-1]["rewards/chosen"]) > 1e-4  # the adapters trained


@SLOW
@pytest.mark.gpu
def test_qlora_trains_adapters_over_4bit_weights(tmp_path, tiny_models, demo_data):
    """QLoRA on the GPU: finite losses, every step applied, the adapters changed, and final/ an
    ordinary bf16 model (dequantized, merged) that loads without bitsandbytes' config."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForImageTextToText

    config = write_config(tmp_path / "c.yaml", tiny_models["internvl"], demo_data,
                          model={"dtype": "bf16", "load_in_4bit": True},
                          loss={"impl": "auto"}, train={"device": "cuda", "max_steps": 3},
                          deepspeed={"zero_stage": 0}, lora={"r": 4, "alpha": 8.0}, data={"eval": ""})
    run = tmp_path / "run"
    mpo("train", config, "--output-dir", run)
    train = rows(run)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["step_applied"] and r["loss"] is not None and abs(r["loss"]) < 1e4 for r in train)
    adapter = load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in adapter.items() if k.endswith("lora_B.weight"))  # B starts at 0
    assert "quantization_config" not in json.loads((run / "final" / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(run / "final", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
