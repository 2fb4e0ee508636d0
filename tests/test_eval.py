"""`mpo eval`: exact scores on scripted responses, images on the tiny InternVL, resumption after a kill;
the sampler on every vision family, loaded for `mpo eval` / `mpo pairs` or switched from the trainer's
packed attention."""

import json

import pytest
import torch
from commands import killed_after, lines, mpo, write_jsonl

from mpo.distributed import Dist
from mpo.generation.prompts import read_prompts
from mpo.generation.sampler import Completion
from mpo.pairs.evaluate import eval_process, write_report
from mpo.pairs.run import run_prompts


class Scripted:
    def __init__(self, script):
        self.script, self.requests = script, []

    def generate(self, requests, *, temperature, seed):
        self.requests += requests
        return [self.script(r) for r in requests]


def test_scores_are_exact_on_scripted_responses(tmp_path, random_seed):
    """Question k gets k correct samples of 4 (k = 0..4), one of them cut off by the token limit, and
    the wrong ones alternate between a wrong answer and no trigger."""
    seed = random_seed
    rng = torch.Generator().manual_seed(seed)
    answers = [str(int(x)) for x in torch.randint(10, 99, (5,), generator=rng)]
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"id": f"q{k}", "question": f"Q{k}?", "answer": a}
                                                 for k, a in enumerate(answers)])
    records = read_prompts(prompts, need="answer")

    def script(request):
        rid, s = request.key.split("#")
        k, s = int(rid[1:]), int(s)
        truth = int(answers[k])
        if s < k:
            return Completion(f"So {truth}.\nFinal answer: {truth}", truncated=s == 0)
        return Completion(f"Final answer: {truth + 1}" if s % 2 else "I am not sure.", truncated=False)

    sampler = Scripted(script)
    settings = {"builder": "eval", "samples": 4}
    run_prompts(records, tmp_path / "out", dist=Dist(0, 1, 0, torch.device("cpu")),
                process=eval_process(sampler, samples=4, instruction="Answer.", temperature=1.0, seed=seed),
                chunk=3, desc="t", settings=settings, progress=False)
    report = write_report(tmp_path / "out", [r.id for r in records], settings)
    wrong = sum(1 for k in range(5) for s in range(k, 4) if s % 2)
    unparsable = sum(1 for k in range(5) for s in range(k, 4) if not s % 2)
    assert report["accuracy"] == pytest.approx((0 + 1 + 2 + 3 + 4) / 20, abs=1e-12), f"seed {seed}"
    assert report["pass@4"] == pytest.approx(4 / 5, abs=1e-12)
    assert report["with_trigger"] == pytest.approx((20 - unparsable) / 20, abs=1e-12)
    assert report["truncated"] == pytest.approx(4 / 20, abs=1e-12)
    assert report["counts"] == {"questions": 5, "responses": 20, "correct": 10, "wrong": wrong,
                                "unparsable": unparsable, "truncated": 4}
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == report
    items = [json.loads(x) for x in lines(tmp_path / "out" / "items.jsonl")]
    assert [i["id"] for i in items] == [r.id for r in records]
    assert all(r.messages[0]["content"].endswith("?\nAnswer.") for r in sampler.requests)
    assert items[2]["verdicts"] == ["correct", "correct", "unparsable", "wrong"]
    assert items[2]["extracted"] == [answers[2], answers[2], None, str(int(answers[2]) + 1)]
    assert items[2]["truncated"] == [True, False, False, False] and items[2]["answer"] == answers[2]


def test_a_question_that_cannot_be_rendered_counts_as_wrong(tmp_path, tiny_models):
    from PIL import Image

    Image.new("RGB", (60, 40), "red").save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "Colour?", "answer": "red", "image": "good.png"},
                                                 {"question": "Colour?", "answer": "red", "image": "bad.png"}])
    mpo("eval", "--model", tiny_models["internvl"], "--prompts", prompts, "--out", tmp_path / "out",
        "--max-new-tokens", "3")
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["questions"] == 2 and report["counts"]["corrupt_image"] == 1 and report["counts"]["responses"] == 1
    items = [json.loads(x) for x in lines(tmp_path / "out" / "items.jsonl")]
    assert "corrupt_image" in items[1]["error"] and len(items[0]["responses"]) == 1


def test_images_on_the_tiny_internvl_match_the_sampler(tmp_path, tiny_models, demo_data):
    """The command's greedy responses are the model's own greedy continuations of the rendered prompts."""
    from mpo.generation.answers import judge
    from mpo.generation.judging import INSTRUCTION, question_with_instruction
    from mpo.generation.sampler import Request, Sampler

    source = (demo_data / "annotations" / "count_train.jsonl").read_text().splitlines()[:5]
    prompts = write_jsonl(tmp_path / "count.jsonl", [json.loads(x) for x in source])
    printed = mpo("eval", "--model", tiny_models["internvl"], "--prompts", prompts, "--image-root", demo_data,
                  "--out", tmp_path / "out", "--max-new-tokens", "6", "--batch-size", "1").stdout
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["questions"] == 5 and report["settings"]["temperature"] == 0.0 and "accuracy=" in printed
    assert report["settings"]["judge"] == judge() and judge().startswith("mpo")
    items = [json.loads(x) for x in lines(tmp_path / "out" / "items.jsonl")]
    records = read_prompts(prompts, need="answer", image_root=demo_data)
    sampler = Sampler.load(tiny_models["internvl"], device=torch.device("cpu"), max_new_tokens=6)
    alone = [sampler.generate([Request(f"{r.id}#0", ({"role": "user", "content": question_with_instruction(
        r.question, INSTRUCTION)},), r.images)], temperature=0.0)[0] for r in records]
    assert [i["responses"] for i in items] == [[c.text for c in alone][k:k + 1] for k in range(5)]
    assert all(i["image"] and i["answer"] == r.answer for i, r in zip(items, records))
    assert report["truncated"] == sum(c.truncated for c in alone) / 5


@pytest.mark.slow
def test_resumes_after_a_kill_and_refuses_other_settings(tmp_path, tiny_models, capsys):
    from mpo.cli import main

    prompts = write_jsonl(tmp_path / "q.jsonl", [{"question": f"What is {k} + {k}?", "answer": str(2 * k)}
                                                 for k in range(10)])
    args = ["eval", "--model", tiny_models["llama"], "--prompts", prompts, "--max-new-tokens", "12",
            "--batch-size", "1", "--samples", "2", "--temperature", "0.7"]
    mpo(*args, "--out", tmp_path / "clean")
    out = tmp_path / "out"
    results = out / "work" / "results.rank0.jsonl"
    done_before = killed_after([*args, "--out", out], results, 2)
    assert not (out / "eval.json").exists()
    assert 2 <= len(done_before) < 10
    with results.open("a") as f:
        f.write('{"id": "9", "que')  # as if killed mid-line
    mpo(*args, "--out", out)
    after = lines(results)
    assert after[:len(done_before)] == done_before and len(after) == 10  # nothing redone, nothing twice
    assert (out / "items.jsonl").read_text() == (tmp_path / "clean" / "items.jsonl").read_text()
    clean = json.loads((tmp_path / "clean" / "eval.json").read_text())
    assert json.loads((out / "eval.json").read_text()) == clean
    assert main([*map(str, args[:-1]), "0.9", "--out", str(out)]) == 1
    assert "holds results made with other settings (temperature differ)" in capsys.readouterr().err
    assert main([*map(str, args[:-1]), "0", "--out", str(tmp_path / "greedy")]) == 1
    assert "--samples 2 with greedy decoding" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gemma3", "internvl_gpt_oss", "internvl_qwen3_moe", "qwen3_vl_moe"])
def test_every_family_samples_the_same_loaded_or_switched_from_training(tiny_models, demo_data, arch):
    """Greedy answers to image and text-only questions from the model as `mpo eval` loads it equal those
    of the trainer's model (packed attention) switched to standard attention for training-time answers."""
    from mpo.generation.sampler import Request, Sampler
    from mpo.models.loading import load_model
    from mpo.train.generation_eval import standard_attention

    image = str(next((demo_data / "images").rglob("*.png")))
    requests = [Request("a", ({"role": "user", "content": "<image>\nHow many?"},), (image,)),
                Request("b", ({"role": "user", "content": "What is 2 + 3?"},), ())]
    loaded = Sampler.load(tiny_models[arch], device=torch.device("cpu"), max_new_tokens=5)
    first = loaded.generate(requests, temperature=0.0)
    model = load_model(tiny_models[arch]).eval()
    with standard_attention(model):
        again = Sampler(model, loaded.renderer, device=torch.device("cpu"), dtype=torch.float32,
                        max_new_tokens=5).generate(requests, temperature=0.0)
    assert [c.text for c in first] == [c.text for c in again] and all(c.text for c in first)
