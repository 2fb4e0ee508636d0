"""The final export without an engine (one rank, ZeRO stage 0; several ranks under ZeRO-3 are the
trainer tests'): the tiny models written in shards exactly as save_pretrained writes them, LoRA
adapters merged layer by layer, a failed write naming its file, and host memory near one shard."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mpo.distributed import Dist
from mpo.models.loading import load_model
from mpo.train.export import INDEX, MODEL_FILES, export_final

ONE_RANK = Dist(0, 1, 0, torch.device("cpu"))


def export(model, source: Path, run: Path, lora=None, **kwargs) -> Path:
    engine = SimpleNamespace(module=SimpleNamespace(model=model, lora=lora))
    return export_final(engine, source, run, ONE_RANK, zero_stage=0, **kwargs)


def weight_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


def sixth(model) -> int:
    """A shard size that splits the model into six files or so."""
    return sum(t.nbytes for t in model.state_dict().values()) // 6


def auto_class(folder: Path):
    from transformers import AutoConfig

    from mpo.families import family_of

    return family_of(AutoConfig.from_pretrained(folder)).auto_class()


# InternVL: saved under the legacy `language_model.model.*` names; Qwen2.5-VL: `visual.*` and `model.*`;
# Llama: names as they are. All three tie the LM head to the embeddings.
@pytest.mark.parametrize("arch", ["internvl", "qwen2_5_vl", "llama"])
def test_shards_are_those_save_pretrained_writes(tmp_path, tiny_models, arch):
    model = load_model(tiny_models[arch])
    with torch.no_grad():  # weights unlike those of the folder it came from
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    shard = sixth(model)
    final = export(model, tiny_models[arch], tmp_path / "run", max_shard_bytes=shard)
    model.save_pretrained(tmp_path / "ref", max_shard_size=shard)

    ours, theirs = weight_files(final), weight_files(tmp_path / "ref")
    assert len(ours) >= 4 and ours.keys() == theirs.keys()
    for name, tensors in ours.items():
        assert tensors.keys() == theirs[name].keys(), name
        for key, t in tensors.items():
            assert t.dtype == theirs[name][key].dtype and torch.equal(t, theirs[name][key]), (name, key)
        with safe_open(final / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    index = json.loads((final / INDEX).read_text())
    assert (final / INDEX).read_text() == (tmp_path / "ref" / INDEX).read_text()
    assert index["weight_map"] == {key: name for name, tensors in ours.items() for key in tensors}
    assert index["metadata"]["total_size"] == sum(t.nbytes for tensors in ours.values() for t in tensors.values())
    for name in ("config.json", "generation_config.json"):
        assert (final / name).read_text() == (tmp_path / "ref" / name).read_text(), name
    others = [f for f in tiny_models[arch].iterdir() if not MODEL_FILES.match(f.name)]
    assert others and all((final / f.name).read_bytes() == f.read_bytes() for f in others)

    loaded, loading = auto_class(final).from_pretrained(final, output_loading_info=True)
    assert not any(loading.values()), loading
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, t in loaded.state_dict().items():
        assert torch.equal(t, expected[key]), key


def test_a_model_within_one_shard_is_one_file(tmp_path, tiny_models):
    model = load_model(tiny_models["llama"])
    final = export(model, tiny_models["llama"], tmp_path / "run")  # the default shard size
    model.save_pretrained(tmp_path / "ref")
    assert sorted(p.name for p in final.glob("model*")) == ["model.safetensors"]
    ours, theirs = load_file(final / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_lora_is_merged_layer_by_layer(tmp_path, tiny_models):
    """final/ equals peft's own merge of every adapter written by save_pretrained; final/adapter holds
    the adapters in peft's layout."""
    from peft.tuners.lora import LoraLayer

    from mpo.models.lora import add_lora

    source = tiny_models["internvl"]
    model = load_model(source)
    lora = add_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=[], modules_to_save=[])
    with torch.no_grad():  # B starts at 0: an adapter that changes its layer
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}
    peft_merged = copy.deepcopy(model)
    for m in peft_merged.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    reference = load_model(source)
    reference.load_state_dict({n.replace(".base_layer.", "."): t for n, t in peft_merged.state_dict().items()
                               if ".lora_" not in n})
    shard = sixth(reference)
    final = export(model, source, tmp_path / "run", lora=lora, max_shard_bytes=shard)
    reference.save_pretrained(tmp_path / "ref", max_shard_size=shard)

    ours, theirs = weight_files(final), weight_files(tmp_path / "ref")
    assert len(ours) >= 4 and ours.keys() == theirs.keys()
    for name, tensors in ours.items():
        assert tensors.keys() == theirs[name].keys(), name
        for key, t in tensors.items():
            torch.testing.assert_close(t, theirs[name][key], rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")
    assert (final / INDEX).read_text() == (tmp_path / "ref" / INDEX).read_text()
    assert (final / "config.json").read_text() == (tmp_path / "ref" / "config.json").read_text()

    loaded = auto_class(final).from_pretrained(final)
    base = load_model(source).state_dict()
    changed = [n for n, t in loaded.state_dict().items() if not torch.equal(t, base[n])]
    assert len(changed) == 14  # q, k, v, o, gate, up, down in both language layers
    saved = load_file(final / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == {"base_model.model." + n.replace(".default.", ".") for n in adapters}
    assert all(torch.equal(saved["base_model.model." + n.replace(".default.", ".")], t) for n, t in adapters.items())
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_a_failed_write_names_the_file_and_leaves_no_final(tmp_path, tiny_models, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    model = load_model(tiny_models["llama"])
    run = tmp_path / "run"
    with pytest.raises(OSError, match=f"^cannot write {re.escape(str(run / '.final.tmp'))}/model-00001-of-"):
        export(model, tiny_models["llama"], run, max_shard_bytes=sixth(model))
    assert not (run / "final").exists()


MEMORY_DRIVER = """
import json, re, sys, tempfile
from pathlib import Path
from types import SimpleNamespace
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from mpo.distributed import Dist
from mpo.train.export import export_final

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

shard, folder = int(sys.argv[1]), Path(sys.argv[2])
model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                                     num_attention_heads=8, num_key_value_heads=8, vocab_size=2048,
                                     tie_word_embeddings=False))
engine = SimpleNamespace(module=SimpleNamespace(model=model, lora=None))
for attempt in range(2):  # the first export also imports what it uses
    run = Path(tempfile.mkdtemp(dir=folder))
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark VmHWM starts again from VmRSS
    export_final(engine, folder, run, Dist(0, 1, 0, torch.device("cpu")), zero_stage=0, max_shard_bytes=shard)
    peak = status("VmHWM") - before
tensors = list(model.state_dict().values())
print(json.dumps({"peak": peak, "model": sum(t.nbytes for t in tensors), "largest": max(t.nbytes for t in tensors),
                  "files": len(list((run / "final").glob("*.safetensors")))}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_host_memory_stays_near_one_shard(tmp_path):
    """A 90 MB model written in 8 MiB shards: the export's peak resident memory above what the process
    held before stays within one shard + the largest tensor + 8 MiB (Python, the safetensors writer,
    allocator slack), under half the model, which gathering everything first would exceed."""
    shard = 8 << 20
    # glibc hands every large block back to the system when freed, so the high-water mark counts
    # live memory, not blocks the allocator kept for reuse
    proc = subprocess.run([sys.executable, "-c", MEMORY_DRIVER, str(shard), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = shard + measured["largest"] + (8 << 20)
    assert measured["files"] >= 10 and bound < measured["model"] / 2, measured
    assert measured["peak"] <= bound, measured
