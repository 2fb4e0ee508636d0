"""A deterministic multimodal reasoning preference set in MMPR format, drawn locally with Pillow.

Three tasks with ground truth, each question about a 112 x 112 PNG:
- count: k shapes of one kind ("How many circles are in the image?");
- bars: a bar chart of 3-4 labelled bars ("Which bar is the tallest?");
- arithmetic: an expression drawn in the image ("What is the result of the expression?").
chosen = a correct step-by-step answer ending "Final answer: X"; rejected = plausible wrong
reasoning. Every answer works through a sequence whose last element is the answer (counting the
shapes 1, 2, 3; reading the bars while keeping the tallest so far; counting on from the first
number); a rejected answer usually concludes something other than where its own sequence ended
(a slip visible in the text, which a tiny model learns to spot in minutes), otherwise it misreads
the image and then reasons consistently (which needs the image).

Layout of DIR: meta.json (train) and meta_heldout.json (held-out), each mapping one dataset per
task to annotations/<task>_<split>.jsonl; images/<split>/<task>_<i>.png. Annotation lines also
carry "answer" (the ground truth). Same seed and sizes -> byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TASKS = ("count", "bars", "arithmetic")
SIZE = 112
SHAPES = ("circle", "square", "triangle")
COLORS = ((220, 40, 40), (40, 110, 220), (30, 160, 60), (200, 140, 20), (140, 60, 180))
TEXT_SLIP = 0.9  # share of rejected answers whose error shows in the text


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _count(rng: random.Random):
    kind, k = rng.choice(SHAPES), rng.randint(1, 6)
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw, color = ImageDraw.Draw(image), rng.choice(COLORS)
    cells = rng.sample(range(9), k)  # a 3 x 3 grid keeps shapes apart
    for cell in cells:
        x, y = 8 + 34 * (cell % 3) + rng.randint(0, 6), 8 + 34 * (cell // 3) + rng.randint(0, 6)
        box = (x, y, x + 22, y + 22)
        if kind == "circle":
            draw.ellipse(box, fill=color)
        elif kind == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(x + 11, y), (x + 22, y + 22), (x, y + 22)], fill=color)
    seq = ", ".join(str(i) for i in range(1, k + 1))
    chosen = f"Let me count the {kind}s one by one: {seq}. There are {k} {kind}s.\nFinal answer: {k}"
    if rng.random() < TEXT_SLIP:
        wrong = k + rng.choice([-1, 1]) if k > 1 else k + 1
        rejected = f"Let me count the {kind}s one by one: {seq}. There are {wrong} {kind}s.\nFinal answer: {wrong}"
    else:
        wrong = k + 1 if k < 6 or rng.random() < 0.5 else k - 1
        seen = ", ".join(str(i) for i in range(1, wrong + 1))
        rejected = f"Let me count the {kind}s one by one: {seen}. There are {wrong} {kind}s.\nFinal answer: {wrong}"
    return image, f"How many {kind}s are in the image?", chosen, rejected, str(k)


def _bars(rng: random.Random):
    n = rng.randint(3, 4)
    labels = "ABCD"[:n]
    values = rng.sample(range(1, 10), n)
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw, font = ImageDraw.Draw(image), _font(12)
    width = (SIZE - 16) // n
    for i, (label, v) in enumerate(zip(labels, values)):
        x = 8 + i * width
        draw.rectangle((x + 4, 94 - 9 * v, x + width - 4, 94), fill=COLORS[i])
        draw.text((x + width // 2 - 4, 97), label, fill="black", font=font)

    def answer(vals):  # read the bars left to right, keeping the tallest so far
        reading = ", ".join(f"{label} is {v}" for label, v in zip(labels, vals))
        running = [labels[max(range(i + 1), key=lambda j: vals[j])] for i in range(n)]
        return f"Reading the chart: {reading}. The tallest so far: {', '.join(running)}.", running[-1]

    best = labels[max(range(n), key=lambda i: values[i])]
    steps, _ = answer(values)
    chosen = f"{steps} The tallest bar is {best}.\nFinal answer: {best}"
    if rng.random() < TEXT_SLIP:  # a conclusion the reading never reached
        never_led = [label for label in labels if label not in steps.split("so far:")[1]]
        wrong = rng.choice(never_led or [label for label in labels if label != best])
        rejected = f"{steps} The tallest bar is {wrong}.\nFinal answer: {wrong}"
    else:  # misread: two bars' values swapped, then read consistently
        misread = list(values)
        i, j = values.index(max(values)), rng.choice([k for k in range(n) if values[k] != max(values)])
        misread[i], misread[j] = misread[j], misread[i]
        steps, wrong = answer(misread)
        rejected = f"{steps} The tallest bar is {wrong}.\nFinal answer: {wrong}"
    return image, "Which bar is the tallest?", chosen, rejected, best


def _arithmetic(rng: random.Random):
    op = rng.choice("+-")  # single-digit operands and results, like the counts
    a, b = (rng.randint(1, 5), rng.randint(2, 4)) if op == "+" else (rng.randint(5, 9), rng.randint(2, 4))
    image = Image.new("RGB", (SIZE, SIZE), "white")
    ImageDraw.Draw(image).text((12, 38), f"{a} {op} {b}", fill="black", font=_font(30))

    def answer(b_read):  # count on (or down) from a, one number per unit of b
        sign = 1 if op == "+" else -1
        counted = [a + sign * k for k in range(1, b_read + 1)]
        way = "Counting on" if op == "+" else "Counting down"
        return (f"The image shows {a} {op} {b_read}. {way} from {a}: {', '.join(map(str, counted))}.",
                counted[-1])

    steps, value = answer(b)
    chosen = f"{steps} The result is {value}.\nFinal answer: {value}"
    if rng.random() < TEXT_SLIP:  # stopped one count short
        wrong = value - (1 if op == "+" else -1)
        rejected = f"{steps} The result is {wrong}.\nFinal answer: {wrong}"
    else:  # misread the second number, then count consistently
        steps, wrong = answer(b + 1)
        rejected = f"{steps} The result is {wrong}.\nFinal answer: {wrong}"
    return image, "What is the result of the expression in the image?", chosen, rejected, str(value)


MAKERS = {"count": _count, "bars": _bars, "arithmetic": _arithmetic}


def _write_split(root: Path, split: str, n: int, seed: int) -> dict:
    rng = random.Random(f"mpo-demo-{seed}-{split}")
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    meta = {}
    for t, task in enumerate(TASKS):
        count = n // len(TASKS) + (t < n % len(TASKS))
        rel = Path("annotations") / f"{task}_{split}.jsonl"
        with (root / rel).open("w", encoding="utf-8") as f:
            for i in range(count):
                image, question, chosen, rejected, answer = MAKERS[task](rng)
                name = Path("images") / split / f"{task}_{i:05d}.png"
                image.save(root / name, format="PNG")
                f.write(json.dumps({"image": name.as_posix(), "question": f"<image>\n{question}",
                                    "chosen": chosen, "rejected": rejected, "answer": answer}) + "\n")
        meta[f"demo_{task}"] = {"root": ".", "annotation": rel.as_posix(), "repeat_time": 1,
                                "max_dynamic_patch": 6, "data_augment": False, "length": count}
    return meta


def write_demo_data(out_dir: str | Path, *, train: int = 1200, heldout: int = 120, seed: int = 0,
                    force: bool = False) -> Path:
    """Generate the set into out_dir (built in a temporary folder, then renamed into place)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"{out_dir} exists and is not empty (use --force to replace it)")
        if not all((out_dir / name).exists() for name in ("meta.json", "meta_heldout.json", "annotations")):
            raise FileExistsError(f"{out_dir} is not a demo set; --force replaces only a demo set")
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for split, n, meta_name in (("train", train, "meta.json"), ("heldout", heldout, "meta_heldout.json")):
            meta = _write_split(tmp, split, n, seed)
            (tmp / meta_name).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
