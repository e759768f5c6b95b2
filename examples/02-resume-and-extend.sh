#!/usr/bin/env bash
# Checkpoints, and training on from them: a run that was stopped (Ctrl-C, a crash, a closed laptop) or that
# turned out too short continues exactly where it left off, with `--resume latest`.
# Needs the toy base, the demo's photos and example 01's dataset. About 2.5 minutes on 2 CPU cores.
set -euo pipefail
BASE="${BASE:-$HOME/.cache/lorakit/toy-base-v2}"
DEMO="${DEMO:-demo}"
OUT="${OUT:-examples-out}"
STEPS="${STEPS:-300}"
MORE_STEPS="${MORE_STEPS:-600}"

# A first run, a checkpoint every STEPS steps (checkpoints/step-000300/: adapter, optimizer state, data order).
lorakit train examples/first-lora.toml --set model.base="$BASE" --set data.folder="$OUT/dataset" \
    --set prior.class_dir="$DEMO/class_photos" --set output.folder="$OUT/runs" --set output.name=resumed \
    --set train.max_steps="$STEPS" --set train.save_every_steps="$STEPS" --overwrite

# Too short: train on to MORE_STEPS from the newest checkpoint. The steps after it are the ones an unbroken run
# of MORE_STEPS would take (same batches, same noise), and metrics.jsonl logs each step once.
lorakit train examples/first-lora.toml --set model.base="$BASE" --set data.folder="$OUT/dataset" \
    --set prior.class_dir="$DEMO/class_photos" --set output.folder="$OUT/runs" --set output.name=resumed \
    --set train.max_steps="$MORE_STEPS" --set train.save_every_steps="$STEPS" --resume latest
