#!/usr/bin/env bash
# A concept slider, learned from prompts alone (no photos): one LoRA whose positive strengths turn the background
# black and negative ones white, with 0 the base itself. The file is an ordinary LoRA: any loader applies it at
# -2 as readily as at 2 (`--lora FILE:-2`, `<lora:background-slider:-2>`).
# Needs the toy base only. About half a minute on 2 CPU cores.
set -euo pipefail
BASE="${BASE:-$HOME/.cache/lorakit/toy-base-v2}"
OUT="${OUT:-examples-out}"
STEPS="${STEPS:-60}"

lorakit plan examples/background-slider.toml --set model.base="$BASE" --vram 8
lorakit train examples/background-slider.toml --set model.base="$BASE" --set output.folder="$OUT/runs" \
    --set train.max_steps="$STEPS" --overwrite
lorakit generate "a red ball on the left, gray background" "a blue ball on the right, gray background" \
    --lora "$OUT/runs/background-slider" --compare-scales=-2,-1,0,1,2 \
    --size 16x16 --steps 20 --guidance 2 --seed 0 --out "$OUT/slider-compare"
