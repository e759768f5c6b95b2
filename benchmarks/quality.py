"""Does the adapter learn the new concept and leave the rest alone? The toy world's learning-quality benchmark.

Run by hand (not part of the test suite; about 5 minutes once the toy base exists, 13 the first time):

    python benchmarks/quality.py [--toy-base DIR] [--steps N] [--seeds 4] [--json quality.json]

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

    from lorakit.generate import apply_adapters, resolve_adapters, set_sampler
    from lorakit.models import load_pipeline
    from lorakit.toy import train_concept
    from lorakit.toy.build import build_toy_base
    from lorakit.toy.evaluate import detector_accuracy, evaluate, pixel_drift

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy-base", help="toy base folder (default: build or reuse the cached one)")
    parser.add_argument("--steps", type=int, help="training steps (default: the toy recipe's)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    seeds = tuple(range(args.seeds))
    start = time.monotonic()
    detectors = detector_accuracy()
    assert all(v >= 0.95 for v in detectors.values()), detectors
    base = Path(args.toy_base) if args.toy_base else build_toy_base(quiet=True, log=lambda _: None)

    def pipeline(adapter=None):
        pipe = load_pipeline(str(base))
        if adapter:
            apply_adapters(pipe, resolve_adapters([(str(adapter), 1.0)])[0])
        set_sampler(pipe, "euler")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    before = evaluate(pipeline(), seeds)
    train_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        run = train_concept(base, Path(tmp), steps=args.steps, quiet=True, log=lambda _: None)
        train_minutes = (time.monotonic() - train_start) / 60
        after = evaluate(pipeline(run.adapter), seeds)
    results = {
        "detector_accuracy": detectors,
        "fidelity_base": before["fidelity"],
        "fidelity_adapter": after["fidelity"],
        "prior_accuracy_base": before["prior_accuracy"],
        "prior_accuracy_adapter": after["prior_accuracy"],
        "prior_colour_accuracy_base": before["prior_colour_accuracy"],
        "prior_colour_accuracy_adapter": after["prior_colour_accuracy"],
        "prior_side_accuracy_base": before["prior_side_accuracy"],
        "prior_side_accuracy_adapter": after["prior_side_accuracy"],
        "prior_pixel_drift": pixel_drift(before["base_images"], after["base_images"]),
        "trigger_images": len(after["trigger_images"]),
        "base_images": len(after["base_images"]),
        "train_minutes": round(train_minutes, 2),
        "wall_minutes": round((time.monotonic() - start) / 60, 2),
    }
    print(f"{'':28}{'base':>8}{'adapter':>9}")
    print(f"{'concept fidelity':28}{results['fidelity_base']:>8.2f}{results['fidelity_adapter']:>9.2f}")
    print(f"{'prior accuracy':28}{results['prior_accuracy_base']:>8.2f}{results['prior_accuracy_adapter']:>9.2f}")
    print(
        f"{'prior colour accuracy':28}{results['prior_colour_accuracy_base']:>8.2f}"
        f"{results['prior_colour_accuracy_adapter']:>9.2f}"
    )
    print(
        f"{'side accuracy (not learned)':28}{results['prior_side_accuracy_base']:>8.2f}"
        f"{results['prior_side_accuracy_adapter']:>9.2f}"
    )
    print(
        f"prior drift {results['prior_pixel_drift']:.1f}/255 mean pixel change; detectors {detectors}; "
        f"training {results['train_minutes']} min, wall {results['wall_minutes']} min"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
