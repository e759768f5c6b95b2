#!/usr/bin/env bash
# The three commands by hand: photos -> dataset -> adapter -> pictures with and without it.
# Needs the toy base and photos: run `lorakit demo --out demo/` once first (README, "Try it").
# About 3 minutes on 2 CPU cores. For your own photos: PHOTOS=./photos, your trigger, a recipe from recipes/.
set -euo pipefail
BASE="${BASE:-$HOME/.cache/lorakit/toy-base-v2}"
DEMO="${DEMO:-demo}"
OUT="${OUT:-examples-out}"
STEPS="${STEPS:-600}"

# 1. prepare: captions from the .txt files beside the photos, the trigger in front, images cropped into buckets.
#    The toy photos repeat poses on purpose, so near duplicates are kept.
lorakit prepare "$DEMO/photos" --out "$OUT/dataset" --trigger sks --resolution 16 --bucket-step 4 \
    --keep-duplicates

# 2. train: the recipe, with the paths of this run.
lorakit train examples/first-lora.toml --set model.base="$BASE" --set data.folder="$OUT/dataset" \
    --set prior.class_dir="$DEMO/class_photos" --set output.folder="$OUT/runs" \
    --set train.max_steps="$STEPS" --overwrite

# 3. generate: the same seeds without the adapter (scale 0) and with it (scale 1), side by side in grid.png.
lorakit generate "a sks ball on the left, white background" "a blue ball on the right, black background" \
    --base "$BASE" --lora "$OUT/runs/first-lora/first-lora.safetensors" --compare-scales 0,1 \
    --size 16x16 --steps 20 --guidance 2 --seed 0 --out "$OUT/compare"
