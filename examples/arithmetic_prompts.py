"""Arithmetic questions with ground-truth answers, split into train and held-out prompt files for
`mpo pairs correctness` and `mpo eval` (used by real_lm_mpo.sh).

    python examples/arithmetic_prompts.py OUT_DIR [--train 240] [--heldout 120] [--seed 0]

Sums and differences of numbers from 2 to 30, asked bare or as a one-line word problem: easy enough
for a 135M model to answer some of them, so that sampling finds correct responses to pair. The two
files share no question.
"""

import argparse
import json
import random
from pathlib import Path

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jo")
THINGS = ("apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards")


def question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    kind = rng.randrange(4)
    if kind == 0:
        return f"What is {a} + {b}?", a + b
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", a - b
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    if kind == 2:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    a, b = max(a, b), min(a, b)
    return f"{name} has {a} {thing} and gives {b} away. How many {thing} does {name} have left?", a - b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for train.jsonl and heldout.jsonl")
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, seen, rows = random.Random(args.seed), set(), []
    while len(rows) < args.train + args.heldout:
        q, answer = question(rng)
        if q not in seen:
            seen.add(q)
            rows.append({"id": f"q{len(rows)}", "question": q, "answer": str(answer)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:args.train]), ("heldout", rows[args.train:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"wrote {args.train} train and {args.heldout} held-out questions to {out}")


if __name__ == "__main__":
    main()
