#!/usr/bin/env bash
# Another adapter type: LoKr (LyCORIS), a Kronecker-product adapter that is often smaller than a LoRA for the
# same quality. The file (LyCORIS layout) loads in ComfyUI, A1111/Forge and `lorakit generate`; diffusers'
# load_lora_weights reads LoRA files only.
# Needs the toy base, the demo's photos and example 01's dataset. About 3 minutes on 2 CPU cores.
set -euo pipefail
BASE="${BASE:-$HOME/.cache/lorakit/toy-base-v2}"
DEMO="${DEMO:-demo}"
OUT="${OUT:-examples-out}"
STEPS="${STEPS:-600}"

lorakit train examples/first-lora.toml --set model.base="$BASE" --set data.folder="$OUT/dataset" \
    --set prior.class_dir="$DEMO/class_photos" --set output.folder="$OUT/runs" --set output.name=first-lokr \
    --set lora.type=lokr --set lora.decompose_factor=4 --set train.max_steps="$STEPS" --overwrite
lorakit inspect "$OUT/runs/first-lokr/first-lokr.safetensors"
lorakit generate "a sks ball on the left, white background" --base "$BASE" \
    --lora "$OUT/runs/first-lokr/first-lokr.safetensors" --compare-scales 0,1 \
    --size 16x16 --steps 20 --guidance 2 --seed 0 --out "$OUT/lokr-compare"
