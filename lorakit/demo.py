"""`lorakit demo`: prepare -> train -> generate -> merge on the toy world, offline, in minutes on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .generate import GenerateOptions, generate
from .merge import merge
from .render import RenderSettings
from .toy import train_concept
from .toy.build import build_toy_base
from .toy.evaluate import GUIDANCE, STEPS
from .toy.world import SIZE, TRIGGER, caption

COMPARE_PROMPTS = [
    caption("", "left", "white", subject=f"a {TRIGGER} ball"),
    caption("", "right", "black", subject=f"a {TRIGGER} ball"),
    caption("red", "right", "gray"),
    caption("blue", "left", "white"),
]


def run_demo(
    out: Path, *, toy_base: Path | None = None, steps: int | None = None, quiet: bool = False, log=print
) -> Path:
    """Run the demo into `out`; returns the folder. Re-running reuses the toy base and the prepared photos."""
    start = time.monotonic()
    out = Path(out).expanduser().resolve()
    base = Path(toy_base).expanduser().resolve() if toy_base else build_toy_base(quiet=quiet, log=log)
    log("1-2/4 prepare and train: the concept photos (trigger 'sks') and the class photos for prior preservation")
    run = train_concept(base, out, steps=steps, quiet=quiet, log=log)
    log("3/4 generate: the base and the adapter side by side (scales 0 and 1)")
    settings = RenderSettings(steps=STEPS, guidance=GUIDANCE, width=SIZE, height=SIZE)
    compare = generate(
        COMPARE_PROMPTS,
        out / "compare",
        GenerateOptions(
            base=str(base),
            loras=((str(run.adapter), 1.0),),
            seed=0,
            count=2,
            settings=settings,
            compare_scales=(0.0, 1.0),
            dtype="float32",
        ),
        quiet=quiet,
        log=log,
    )
    log("4/4 merge: the adapter baked into a copy of the base")
    merged = merge([(str(run.adapter), 1.0)], out / "merged", base=str(base), overwrite=True, log=log)
    summary = {
        "adapter": str(run.adapter),
        "diffusers_adapter": str(run.diffusers_adapter),
        "grid": str(compare.grid),
        "merged": str(merged.out),
        "minutes": round((time.monotonic() - start) / 60, 2),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log(f"Done in {summary['minutes']} min: adapter {run.adapter}, grid {compare.grid}, merged model {merged.out}")
    return out
