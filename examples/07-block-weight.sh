#!/usr/bin/env bash
# A strength per block (LoRA Block Weight, written as the webuis' extension writes it): where in the U-Net the
# adapter works, a grid comparing block vectors, and one vector baked into a file every UI draws at strength 1.
# Needs the toy base and example 01's adapter. About 1 minute on 2 CPU cores.
set -euo pipefail
BASE="${BASE:-$HOME/.cache/lorakit/toy-base-v2}"
OUT="${OUT:-examples-out}"
ADAPTER="$OUT/runs/first-lora/first-lora.safetensors"
mkdir -p "$OUT/blocks"

# The update norm of each block: BASE is the text encoder; the toy U-Net has attention in IN01, IN03, M00 and
# OUT00-OUT03 (an SD 1.5 U-Net in IN01, IN02, IN04, IN05, IN07, IN08, M00 and OUT03-OUT11).
lorakit inspect "$ADAPTER"

# 26 values: BASE, IN00-IN11, M00, OUT00-OUT11. The whole adapter; the text encoder and the input blocks alone; the
# middle and output blocks alone. On an SD 1.5 adapter the extension's presets (ALL, INALL, OUTALL ...) do this.
WHOLE="1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"
INPUTS="1,0,1,0,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"
OUTPUTS="0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0,0,0,0"
lorakit generate "a sks ball on the left, white background" --base "$BASE" --lora "$ADAPTER" \
    --compare-lbw "$WHOLE" --compare-lbw "$INPUTS" --compare-lbw "$OUTPUTS" \
    --size 16x16 --steps 20 --guidance 2 --seed 0 -n 2 --out "$OUT/blocks/compare"

# The middle and output blocks alone, baked into an adapter file of their own (the same in any UI at strength 1).
lorakit merge --lora "$ADAPTER:1:lbw=$OUTPUTS" --out "$OUT/blocks/outputs-only.safetensors" --overwrite
lorakit inspect "$OUT/blocks/outputs-only.safetensors"
