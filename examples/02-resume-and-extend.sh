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

# Too short: train on to MORE_STEPS from the newest checkpoint. With this recipe's constant learning rate the
# adapter is bit for bit the one an unbroken run of MORE_STEPS gives (same batches, same noise; a schedule such
# as cosine depends on max_steps, so there it differs), and metrics.jsonl logs each step once. After a crash or
# Ctrl-C, the same command with the same max_steps finishes the run exactly as if nothing had happened.
lorakit train examples/first-lora.toml --set model.base="$BASE" --set data.folder="$OUT/dataset" \
    --set prior.class_dir="$DEMO/class_photos" --set output.folder="$OUT/runs" --set output.name=resumed \
    --set train.max_steps="$MORE_STEPS" --set train.save_every_steps="$STEPS" --resume latest
