#!/usr/bin/env bash
# An image slider, learned from photo pairs: the same scenes with a change (a red ball) and without it (a blue
# one), captioned alike. `data.adapter_strength = [1.0, -1.0]` trains the first folder at +1 and the second at -1,
# so the adapter draws red at +1, blue at -1 and the base at 0. Bring your own pairs the same way: two prepared
# folders whose photos differ only in what the slider should move.
# Needs the toy base only. About a minute on 2 CPU cores.
set -euo pipefail
BASE="${BASE:-$HOME/.cache/lorakit/toy-base-v2}"
OUT="${OUT:-examples-out}"
STEPS="${STEPS:-200}"

lorakit toy pairs "$OUT/pairs"
lorakit prepare "$OUT/pairs/red" --out "$OUT/red-dataset" --resolution 16 --bucket-step 4 --keep-duplicates
lorakit prepare "$OUT/pairs/blue" --out "$OUT/blue-dataset" --resolution 16 --bucket-step 4 --keep-duplicates
lorakit train examples/colour-slider.toml --set model.base="$BASE" \
    --set data.folder="[\"$OUT/red-dataset\", \"$OUT/blue-dataset\"]" --set output.folder="$OUT/runs" \
    --set train.max_steps="$STEPS" --overwrite
lorakit generate "a ball on the left, white background" "a ball on the right, black background" \
    --lora "$OUT/runs/colour-slider" --compare-scales=-1,0,1 \
    --size 16x16 --steps 20 --guidance 2 --seed 0 --out "$OUT/colour-compare"
