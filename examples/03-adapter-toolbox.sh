#!/usr/bin/env bash
# What to do with an adapter once it is trained: look inside it, shrink it, change its layout, combine two into
# one, bake one into the base model and extract it back out. Every output is a .safetensors file the webuis and
# diffusers load.
# Needs the toy base and example 01's adapter. About 1.5 minutes on 2 CPU cores.
set -euo pipefail
BASE="${BASE:-$HOME/.cache/lorakit/toy-base-v2}"
OUT="${OUT:-examples-out}"
ADAPTER="$OUT/runs/first-lora/first-lora.safetensors"
mkdir -p "$OUT/tools"

# Layout (kohya or diffusers), architecture, rank and alpha per module, the training metadata.
lorakit inspect "$ADAPTER"

# Rank 8 -> 4 by SVD: half the size; the report says how much of each update the smaller rank keeps.
lorakit resize "$ADAPTER" --rank 4 --out "$OUT/tools/first-lora-r4.safetensors" --overwrite

# kohya layout (A1111/Forge, ComfyUI) -> diffusers/peft layout, and back.
lorakit convert "$ADAPTER" --to diffusers --out "$OUT/tools/first-lora.diffusers.safetensors" --overwrite

# Two adapters into one file at chosen strengths (exactly: the ranks are stacked; --rank N would use SVD).
lorakit merge --lora "$ADAPTER:0.7" --lora "$OUT/tools/first-lora-r4.safetensors:0.3" \
    --out "$OUT/tools/combined.safetensors" --overwrite

# One adapter baked into the base: a model that draws the concept with no adapter loaded, as one single file.
lorakit merge --lora "$ADAPTER" --base "$BASE" --out "$OUT/tools/merged-model.safetensors" --overwrite
lorakit generate "a sks ball on the left, white background" --base "$OUT/tools/merged-model.safetensors" \
    --config "$BASE" --size 16x16 --steps 20 --guidance 2 --seed 0 --out "$OUT/tools/merged-render"

# And back out: the adapter inside the merged model, extracted as its difference from the base (SVD per module; at
# the adapter's own rank, 8, it comes back whole, and the report says how much of the change it keeps).
lorakit extract "$OUT/tools/merged-model.safetensors" --base "$BASE" --config "$BASE" --rank 8 \
    --out "$OUT/tools/extracted.safetensors" --overwrite
