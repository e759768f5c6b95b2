"""Does the adapter learn the new concept and leave the rest alone? The toy world's learning-quality benchmark.

Run by hand (not part of the test suite): 8 minutes at two guidance scales once the toy base exists (13 the
first time), and about 3 minutes of training plus 3-4 of measuring per guidance scale for each --variant:

    python benchmarks/quality.py [--toy-base DIR] [--steps N] [--seeds 4] [--guidance 2,4,7] [--json quality.json]
    python benchmarks/quality.py --contexts white [--masks] [--set lora.tlora_min_rank=1 ...]   # new contexts

1. checks the detectors on the generator's own labelled renders (each must be >= 0.95 accurate);
2. renders fixed prompts at fixed seeds with the base model: trigger prompts ("a sks ball on the left,
   white background") and the base world's captions ("a red ball on the right, gray background");
3. trains the shipped toy recipe as a user would: concept photos and class photos -> prepare -> train
   (`lorakit.toy.train_concept`);
4. renders the same prompts and seeds with the adapter, and reports concept fidelity (share of trigger
   images in the concept colour), prior accuracy (share of base-world images showing their caption's
   colour and background; left/right, which the base does not learn, is reported on its own) before and
   after, prior drift (mean pixel change) and wall time.

New contexts: `--contexts white` gives the concept photos one shared background (as a person's photos share a
room), and fidelity is then counted in context (the concept's colour on the background the prompt asked for)
separately on the seen backgrounds and the unseen ones. `--masks` writes each photo's mask (white on the ball)
beside it, for `--set data.masked_loss=true`. A T-LoRA adapter (`--set lora.tlora_min_rank=N`) is measured twice:
under its timestep schedule (as `lorakit generate` draws it) and at full rank (as other loaders draw it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROWS = (
    ("concept fidelity (colour)", "fidelity"),
    ("in context, seen backgrounds", "fidelity_seen"),
    ("in context, unseen backgrounds", "fidelity_unseen"),
    ("prior accuracy", "prior_accuracy"),
    ("prior colour accuracy", "prior_colour_accuracy"),
    ("side accuracy (not learned)", "prior_side_accuracy"),
)


def _summary(found: dict, seen: tuple[str, ...]) -> dict:
    """The evaluation's figures, with in-context fidelity split into the seen and the unseen backgrounds."""
    by_background = found["fidelity_by_background"]
    unseen = [b for b in by_background if b not in seen]
    figures = {key: found[key] for _, key in ROWS if key in found}
    figures["fidelity_seen"] = sum(by_background[b] for b in seen) / len(seen)
    figures["fidelity_unseen"] = sum(by_background[b] for b in unseen) / len(unseen) if unseen else float("nan")
    figures["fidelity_by_background"] = by_background
    return figures


def main() -> None:
    import torch  # noqa: F401 - import the stack before timing

    from lorakit.toy import train_concept
    from lorakit.toy.build import build_toy_base
    from lorakit.toy.evaluate import detector_accuracy, evaluate, pixel_drift, toy_pipeline
    from lorakit.toy.world import BACKGROUNDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy-base", help="toy base folder (default: build or reuse the cached one)")
    parser.add_argument("--steps", type=int, help="training steps (default: the toy recipe's)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--guidance", default="2,4,7", help="classifier-free guidance scales to measure at")
    parser.add_argument("--contexts", help="comma-separated backgrounds the concept photos are limited to")
    parser.add_argument("--masks", action="store_true", help="write a mask beside each concept photo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="toy recipe override")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'LABEL: [masks] KEY=VALUE ...'",
        help="train and measure several variants against one base measurement (instead of --masks/--set)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    seeds = tuple(range(args.seeds))
    guidances = [float(g) for g in args.guidance.split(",")]
    contexts = tuple(args.contexts.split(",")) if args.contexts else tuple(BACKGROUNDS)
    variants = [_variant(text) for text in args.variant] or [("adapter", args.masks, args.set)]
    start = time.monotonic()
    detectors = detector_accuracy()
    assert all(v >= 0.95 for v in detectors.values()), detectors
    base = Path(args.toy_base) if args.toy_base else build_toy_base(quiet=True, log=lambda _: None)

    before = {g: evaluate(toy_pipeline(base), seeds, g) for g in guidances}
    results = {
        "contexts": list(contexts),
        "detector_accuracy": detectors,
        "seeds": len(seeds),
        "base": {str(g): _summary(before[g], contexts) for g in guidances},
        "variants": {},
    }
    for label, masks, overrides in variants:
        train_start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            run = train_concept(
                base,
                Path(tmp),
                steps=args.steps,
                backgrounds=contexts if args.contexts else None,
                masks=masks,
                overrides=tuple(overrides),
                quiet=True,
                log=lambda _: None,
            )
            train_minutes = (time.monotonic() - train_start) / 60
            scheduled = any(s.startswith("lora.tlora_min_rank") for s in overrides)
            ways = {label: True, f"{label} (full rank)": False} if scheduled else {label: True}
            after = {
                way: {g: evaluate(toy_pipeline(base, run.adapter, ranks, run.embedding), seeds, g) for g in guidances}
                for way, ranks in ways.items()
            }
        for way, found in after.items():
            entry = {"masks": masks, "overrides": overrides, "train_minutes": round(train_minutes, 2)}
            for g in guidances:
                entry[str(g)] = _summary(found[g], contexts)
                entry[str(g)]["prior_pixel_drift"] = pixel_drift(before[g]["base_images"], found[g]["base_images"])
            results["variants"][way] = entry
        _print(results, guidances, contexts)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    results["wall_minutes"] = round((time.monotonic() - start) / 60, 2)
    print(f"detectors {detectors}; wall {results['wall_minutes']} min")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def _variant(text: str) -> tuple[str, bool, list[str]]:
    """'LABEL: masks key=value ...' -> (label, masks, overrides)."""
    label, _, rest = text.partition(":")
    words = rest.split()
    return label.strip(), "masks" in words, [w for w in words if w != "masks"]


def _print(results: dict, guidances: list[float], contexts: tuple[str, ...]) -> None:
    for g in guidances:
        columns = {"base": results["base"][str(g)]} | {k: v[str(g)] for k, v in results["variants"].items()}
        print(f"guidance {g:g}: concept photos on {', '.join(contexts)}")
        print(f"  {'':32}" + "".join(f"{way[:14]:>15}" for way in columns))
        for label, key in ROWS:
            print(f"  {label:32}" + "".join(f"{c[key]:>15.2f}" for c in columns.values()))
        print(
            f"  {'prior drift (of 255)':32}"
            + "".join(f"{c.get('prior_pixel_drift', 0):>15.1f}" for c in columns.values())
        )


if __name__ == "__main__":
    main()
