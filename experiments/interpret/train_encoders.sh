#!/usr/bin/env bash
# The encoders `mindhier interpret` is run on for issue 17's results (experiments/interpret/):
# the demo recipe's stage 1 (the command `mindhier demo` runs, recorded in
# checkpoints/demo/encoder.json) for each world subject, with full hierarchical supervision and
# with final-only supervision (paper Table 2's middle row: the control), over seeds.
# Resumable: a run whose checkpoint exists is skipped; an interrupted one is resumed.
#   bash experiments/interpret/train_encoders.sh [RUNS=runs/interpret]
set -euo pipefail
RUNS=${1:-runs/interpret}
PY=${PYTHON:-.venv/bin/python}
train() {  # subject supervision seed
  local out="$RUNS/encoder-s$1-$2-seed$3"
  local resume=()
  if [[ -f "$out/encoder.json" ]]; then  # written at every epoch end: finished when step = total_steps
    if "$PY" -c 'import json,sys; p=json.load(open(sys.argv[1]))["progress"]; sys.exit(p["step"] != p["total_steps"])' \
        "$out/encoder.json"; then echo "have $out"; return; fi
    resume=(--resume)
  fi
  echo "train $out"
  "$PY" -m mindhier train-encoder --data worlds/demo --subject "$1" --vision checkpoints/foundation/vision \
    --out "$out" --preset demo --epochs 4 --global-batch 64 --lr 5e-4 --supervision "$2" --seed "$3" \
    --target-cache "$RUNS/targets" "${resume[@]}"
}
for s in 1 2 5 7; do train "$s" hierarchical 0; done
for s in 1 2 5 7; do train "$s" final-only 0; done
for seed in 1 2; do train 1 hierarchical "$seed"; train 1 final-only "$seed"; done
