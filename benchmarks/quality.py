"""Does the adapter learn the new concept and leave the rest alone? The toy world's learning-quality benchmark.

Run by hand (not part of the test suite; about 5 minutes once the toy base exists, 13 the first time):

    python benchmarks/quality.py [--toy-base DIR] [--steps N] [--seeds 4] [--guidance 2,4] [--json quality.json]

1. checks the detectors on the generator's own labelled renders (each must be >= 0.95 accurate);
2. renders fixed prompts at fixed seeds with the base model: trigger prompts ("a sks ball on the left,
   white background") and the base world's captions ("a red ball on the right, gray background");
3. trains the shipped toy recipe as a user would: concept photos and class photos -> prepare -> train
   (`lorakit.toy.train_concept`);
4. renders the same prompts and seeds with the adapter, and reports concept fidelity (share of trigger
   images in the concept colour), prior accuracy (share of base-world images showing their caption's
   colour and background; left/right, which the base does not learn, is reported on its own) before and
   after, prior drift (mean pixel change) and wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch  # noqa: F401 - import the stack before timing

    from lorakit.toy import train_concept
    from lorakit.toy.build import build_toy_base
    from lorakit.toy.evaluate import detector_accuracy, evaluate, pixel_drift, toy_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy-base", help="toy base folder (default: build or reuse the cached one)")
    parser.add_argument("--steps", type=int, help="training steps (default: the toy recipe's)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--guidance", default="2,4", help="classifier-free guidance scales to measure at")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    seeds = tuple(range(args.seeds))
    guidances = [float(g) for g in args.guidance.split(",")]
    start = time.monotonic()
    detectors = detector_accuracy()
    assert all(v >= 0.95 for v in detectors.values()), detectors
    base = Path(args.toy_base) if args.toy_base else build_toy_base(quiet=True, log=lambda _: None)

    before = {g: evaluate(toy_pipeline(base), seeds, g) for g in guidances}
    train_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        run = train_concept(base, Path(tmp), steps=args.steps, quiet=True, log=lambda _: None)
        train_minutes = (time.monotonic() - train_start) / 60
        after = {g: evaluate(toy_pipeline(base, run.adapter), seeds, g) for g in guidances}
    results = {
        "detector_accuracy": detectors,
        "seeds": len(seeds),
        "train_minutes": round(train_minutes, 2),
        "wall_minutes": round((time.monotonic() - start) / 60, 2),
        "by_guidance": {},
    }
    rows = (
        ("concept fidelity", "fidelity"),
        ("prior accuracy", "prior_accuracy"),
        ("prior colour accuracy", "prior_colour_accuracy"),
        ("side accuracy (not learned)", "prior_side_accuracy"),
    )
    for g in guidances:
        entry = {
            f"{key}_{when}": found[g][key]
            for key in dict(rows).values()
            for when, found in (("base", before), ("adapter", after))
        }
        entry["prior_pixel_drift"] = pixel_drift(before[g]["base_images"], after[g]["base_images"])
        entry["trigger_images"] = len(after[g]["trigger_images"])
        entry["base_images"] = len(after[g]["base_images"])
        results["by_guidance"][str(g)] = entry
        print(f"guidance {g:g}: {entry['trigger_images']} trigger images, {entry['base_images']} base-world images")
        print(f"  {'':28}{'base':>8}{'adapter':>9}")
        for label, key in rows:
            print(f"  {label:28}{entry[key + '_base']:>8.2f}{entry[key + '_adapter']:>9.2f}")
        print(f"  prior drift {entry['prior_pixel_drift']:.1f}/255 mean pixel change")
    print(f"detectors {detectors}; training {results['train_minutes']} min, wall {results['wall_minutes']} min")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
