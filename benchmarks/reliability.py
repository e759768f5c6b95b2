"""Reliability with the full counts: every kill point of a training run, random SIGKILLs, an I/O error at every
write site, every power-loss state of a checkpoint save, and 10,000 fuzz cases per untrusted-input reader; one
table against the targets.

    python benchmarks/reliability.py                          # the full counts (about 35 minutes on 2 cores)
    python benchmarks/reliability.py --random-kills 20 --fuzz-examples 500 --out reliability.md   # a quick look

The runs use the tiny test model (tests/tiny.py) through the fork-after-import harness of tests/reliability.py:
one process imports the ML stack, every run forks from it. Targets: 0 corrupt files, every finished adapter bitwise
equal to the uninterrupted run's, no step lost or logged twice, 0 escaped exceptions.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def kills(args, root: Path, figures: Counter) -> None:
    from tests import reliability as harness
    from tests.conftest import make_recipe_dict
    from tests.tiny import save_tiny_pipeline, write_tiny_dataset

    base = save_tiny_pipeline(root / "base")
    data = write_tiny_dataset(root / "dataset")
    settings = {"max_steps": 4, "save_every_steps": 2, "keep_checkpoints": 1, "log_every_steps": 1}

    def recipe(name: str) -> dict:
        return make_recipe_dict(base, data, root / name, train=dict(settings))

    zygote = harness.Zygote()
    try:
        assert zygote.run(recipe("reference"), overwrite=True) == 0
        reference = root / "reference" / "run"
        started = time.perf_counter()  # a warm run from a cleared cache: how long a killed run can live
        points = harness.trace_kill_points(zygote, recipe("trace"), root / "trace.txt")
        run_seconds = time.perf_counter() - started
        chosen = lambda count: points if count < 0 else points[:count]  # noqa: E731
        cases = [("kill point", point, None) for point in chosen(args.kill_points)]
        delays = harness.random_delays(args.random_kills, longest=max(1.0, run_seconds), seed=args.seed)
        cases += [("random SIGKILL", None, delay) for delay in delays]
        cases += [("I/O fault", point, None) for point in chosen(args.io_faults)]
        names = {"kill point": "kill points", "random SIGKILL": "random SIGKILL runs", "I/O fault": "I/O faults"}
        for number, (kind, point, delay) in enumerate(cases, start=1):
            fail = kind == "I/O fault"
            outcome = harness.kill_and_finish(zygote, recipe("killed"), reference, point=point, delay=delay, fail=fail)
            figures[names[kind]] += 1
            figures["SIGKILLs that landed"] += outcome.killed
            figures["I/O faults ending in a traceback"] += fail and outcome.exit_code != 2
            figures["resumed from a checkpoint"] += outcome.resumed
            figures["corrupt files"] += len(outcome.problems)
            figures["escaped exceptions"] += outcome.escaped
            figures["adapters not bit-identical"] += not outcome.identical
            figures["runs with a step lost or logged twice"] += not outcome.steps_logged_once
            if outcome.problems or not outcome.identical or not outcome.steps_logged_once or outcome.escaped:
                print(f"  FAILED {kind} {point or f'{delay:.2f} s'}: {outcome}", flush=True)
            if number % 20 == 0:
                print(f"  {number}/{len(cases)} runs", flush=True)
    finally:
        zygote.close()


def power_loss(root: Path, figures: Counter) -> None:
    import pytest

    from tests import reliability as harness

    with pytest.MonkeyPatch.context() as patch:
        states, operations, resumed = harness.replay_power_loss(root / "power", patch)
    figures["power-loss states (checkpoint save)"] += states
    figures["recorded save operations"] += operations


def fuzz(args, figures: Counter) -> None:
    env = {**os.environ, "LORAKIT_FUZZ_EXAMPLES": str(args.fuzz_examples), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    for line in result.stdout.splitlines():
        match = re.match(r"\s+(fuzz cases: .+?)\s+([\d,]+)$", line)
        if match:
            figures[match.group(1)] += int(match.group(2).replace(",", ""))
    failed = re.search(r"(\d+) failed", result.stdout)
    figures["fuzz targets failing (escaped exceptions)"] += int(failed.group(1)) if failed else 0
    if result.returncode:
        print(result.stdout[-4000:], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-points", type=int, default=-1, help="The first N traced kill points (-1: all).")
    parser.add_argument("--io-faults", type=int, default=-1, help="I/O errors at the first N traced points (-1: all).")
    parser.add_argument("--random-kills", type=int, default=200)
    parser.add_argument("--fuzz-examples", type=int, default=10_000, help="Per fuzz target; 0 skips fuzzing.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="Also write the table (Markdown) here.")
    args = parser.parse_args()
    figures: Counter = Counter()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        kills(args, Path(tmp), figures)
        power_loss(Path(tmp), figures)
    if args.fuzz_examples:
        fuzz(args, figures)
    bad = (
        "corrupt files",
        "escaped exceptions",
        "adapters not bit-identical",
        "runs with a step lost or logged twice",
        "I/O faults ending in a traceback",
    )
    lines = ["| figure | count | target |", "|---|---|---|"]
    for name, count in figures.items():
        target = "0" if name in bad or name.startswith("fuzz targets failing") else ""
        lines.append(f"| {name} | {count:,} | {target} |")
    lines.append(f"| wall time | {time.perf_counter() - started:.0f} s | |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    missed = [n for n in figures if (n in bad or n.startswith("fuzz targets failing")) and figures[n]]
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
