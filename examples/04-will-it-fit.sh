#!/usr/bin/env bash
# Before renting or buying a GPU: the peak memory of each shipped recipe by phase and part, on the card you name,
# and the cheapest changes that make a recipe fit a smaller one. Nothing is downloaded or trained: the real
# architectures are built without weights. About a minute on 2 CPU cores.
set -euo pipefail
OUT="${OUT:-examples-out}"

# SD 1.5 character recipe on a 12 GB card: the breakdown, the verdict, disk, time.
lorakit plan recipes/character.toml --gpu "RTX 3060 12GB"

# SDXL on Windows with 8 GB: what to change, printed as a diff and written as a recipe you can train.
lorakit plan recipes/sdxl-character.toml --fit 8GB --os windows --out "$OUT/sdxl-character-8gb.toml" --overwrite

# The same estimate as JSON, for scripts.
lorakit plan recipes/style.toml --vram 16 --json
