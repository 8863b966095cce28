#!/usr/bin/env bash
# Issue 17's result: `mindhier interpret` on the demo world's four subjects, hierarchical
# supervision against the final-only control, three seeds for subject 1; then the summary.
#   bash experiments/interpret/run.sh            (resumable: trained encoders and finished runs are kept)
# Writes runs/interpret/* (not committed) and experiments/interpret/{SUMMARY.md,summary.json,*.png}.
set -euo pipefail
RUNS=${RUNS:-runs/interpret}
PY=${PYTHON:-.venv/bin/python}
bash "$(dirname "$0")/train_encoders.sh" "$RUNS"
outs=()
for enc in "$RUNS"/encoder-s*-seed*; do
  out="$enc/interpret"
  outs+=("$out")
  [[ -f "$out/interpret.json" ]] && { echo "have $out"; continue; }
  subject=$(basename "$enc" | sed -E 's/encoder-s([0-9]+)-.*/\1/')
  vision=(); [[ "$enc" == *hierarchical-seed0 ]] && vision=(--vision checkpoints/foundation/vision)
  "$PY" -m mindhier interpret --data worlds/demo --subject "$subject" --encoder "$enc/encoder" \
    "${vision[@]}" --out "$out" --quiet > /dev/null
  echo "wrote $out"
done
"$PY" -m mindhier interpret-summary "${outs[@]}" --out experiments/interpret
for s in 1 2 5 7; do  # the per-subject pictures of MindHier's encoder, beside the summary
  cp "$RUNS/encoder-s$s-hierarchical-seed0/interpret/heatmap.png" "experiments/interpret/heatmap_s$s.png"
  cp "$RUNS/encoder-s$s-hierarchical-seed0/interpret/best_block_map.png" "experiments/interpret/best_block_map_s$s.png"
done
