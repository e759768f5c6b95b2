"""What the toy-world step-time benchmarks share (`slider_speed.py`, `float8_speed.py`): the toy base with a
prepared dataset of its concept photos, and a run's seconds per step from its `metrics.jsonl`."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path


def step_seconds(run_dir: Path, warmup: int) -> float:
    """The mean of the differences of `metrics.jsonl`'s `elapsed_s` after `warmup` steps (a mean, as an ETA sums
    them)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [row["elapsed_s"] for row in rows]
    return statistics.mean(b - a for a, b in zip(times[warmup:], times[warmup + 1 :], strict=False))


def toy_base_and_dataset(prefix: str) -> tuple[Path, Path]:
    """(the toy base, built once per machine; a new work folder whose `dataset/` holds the prepared concept
    photos)."""
    from lorakit.prepare import PrepareOptions, prepare
    from lorakit.toy import write_concept_photos
    from lorakit.toy.build import build_toy_base
    from lorakit.toy.world import SIZE, TRIGGER

    base = build_toy_base(quiet=True, log=lambda _: None)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    photos = write_concept_photos(work / "photos")
    options = PrepareOptions(trigger=TRIGGER, resolution=SIZE, bucket_step=4, workers=1, keep_duplicates=True)
    prepare(photos, work / "dataset", options, quiet=True, log=lambda _: None)
    return Path(base), work
