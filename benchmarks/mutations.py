"""Does the suite notice when a feature is removed? Each mutation disables one feature in the source, runs the
default suite (stopping at the first failure), and reports which test caught it. Run by hand from a checkout:

    python benchmarks/mutations.py            # every mutation, one suite run each
    python benchmarks/mutations.py noise_offset ema

A mutation no test catches is a feature the suite does not hold. The source is restored after each run; the output
of the run that caught a mutation is kept in $TMPDIR/lorakit-mutations/NAME.log, to tell a real catch from an
unrelated failure. To keep a run short, the test files named with a mutation run first; only when they miss it
does the whole suite run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (file, exact text, replacement that switches the feature off)
MUTATIONS = {
    "noise_offset": ("lorakit/objective.py", "    if noise_offset:\n", "    if False:\n"),
    "min_snr": ("lorakit/objective.py", "    if not min_snr_gamma:\n", "    if True:\n"),
    "caption_dropout": (
        "lorakit/data.py",
        "    if section.caption_dropout and rng.random() < section.caption_dropout:\n",
        "    if False:\n",
    ),
    "shuffle_tags": ("lorakit/data.py", "    rng.shuffle(rest)\n", "    pass\n"),
    "keep_tokens": (
        "lorakit/data.py",
        "    fixed, rest = tags[: section.keep_tokens], tags[section.keep_tokens :]\n",
        "    fixed, rest = [], tags\n",
    ),
    "flip": (
        "lorakit/train/loop.py",
        "    flips = [data.flip and rng.random() < 0.5 for _ in batch]\n",
        "    flips = [False for _ in batch]\n",
    ),
    "prior_loss_weight": (
        "lorakit/train/loop.py",
        "    weights = weights * torch.tensor([run.items[i].loss_weight for i in batch])\n",
        "",
    ),
    "ema": (
        "lorakit/ema.py",
        "                self.shadow[name].lerp_(param.detach().float(), 1 - decay)\n",
        "                pass\n",
    ),
    "init_from": ("lorakit/train/setup.py", "    if lora.init_from:\n", "    if False:\n"),
    "max_grad_norm": ("lorakit/train/loop.py", "    if cfg.max_grad_norm:\n", "    if False:\n"),
    "lr_warmup": ("lorakit/optim.py", "num_warmup_steps=section.lr_warmup_steps", "num_warmup_steps=0"),
    "num_repeats": (
        "lorakit/data.py",
        "size, bucket, repeats, folder=str(folder)",
        "size, bucket, 1, folder=str(folder)",
    ),
    "text_cache": (
        "lorakit/train/setup.py",
        "    if recipe.lora.train_text_encoder or data.shuffle_tags:\n",
        "    if True:\n",
    ),
    "trigger": ("lorakit/trigger.py", "    if not trigger or contains_trigger(caption, trigger):\n", "    if True:\n"),
    "accumulation_scale": (
        "lorakit/train/loop.py",
        "            accelerator.backward(loss / accumulation)\n",
        "            accelerator.backward(loss)\n",
    ),
    "render_dtype": ("lorakit/generate.py", "dtype=dtype, log=log)", "log=log)"),
    "merge_precision": ("lorakit/merge.py", "    pipe.to(dtype=getattr(torch, save))\n", ""),
}


# where each mutation is expected to be caught (run first; the whole suite runs when these miss it)
LIKELY = {
    "noise_offset": ["tests/test_objective.py"],
    "min_snr": ["tests/test_objective.py"],
    "caption_dropout": ["tests/test_knobs.py", "tests/test_train.py", "tests/test_features.py"],
    "shuffle_tags": ["tests/test_knobs.py", "tests/test_train.py", "tests/test_features.py"],
    "keep_tokens": ["tests/test_knobs.py", "tests/test_train.py", "tests/test_features.py"],
    "flip": ["tests/test_knobs.py", "tests/test_resume.py", "tests/test_train.py", "tests/test_sdxl.py"],
    "prior_loss_weight": ["tests/test_knobs.py", "tests/test_features.py"],
    "ema": ["tests/test_knobs.py", "tests/test_resume.py", "tests/test_export.py"],
    "init_from": ["tests/test_features.py"],
    "max_grad_norm": ["tests/test_knobs.py", "tests/test_train.py", "tests/test_resume.py"],
    "lr_warmup": ["tests/test_knobs.py", "tests/test_train.py", "tests/test_resume.py"],
    "num_repeats": ["tests/test_features.py", "tests/test_train.py"],
    "text_cache": ["tests/test_features.py", "tests/test_correctness.py"],
    "trigger": ["tests/test_knobs.py", "tests/test_train.py", "tests/test_generate.py", "tests/test_prepare.py"],
    "accumulation_scale": ["tests/test_train.py"],
    "render_dtype": ["tests/test_generate.py"],
    "merge_precision": ["tests/test_merge.py"],
}


LOGS = Path(tempfile.gettempdir()) / "lorakit-mutations"  # the output of the run that caught each mutation


def _pytest(paths: list[str]) -> tuple[list[str], str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return re.findall(r"^FAILED (\S+)", done.stdout, re.MULTILINE), done.stdout + done.stderr


def run(name: str) -> tuple[bool, str, float]:
    file, old, new = MUTATIONS[name]
    path = ROOT / file
    original = path.read_text()
    if original.count(old) != 1:
        return False, f"mutation text not found once in {file}", 0.0
    path.write_text(original.replace(old, new))
    started = time.monotonic()
    try:
        failed, output = _pytest(LIKELY[name]) if LIKELY.get(name) else ([], "")
        if not failed:
            failed, output = _pytest([])
    finally:
        path.write_text(original)
    if not failed:
        return False, "no test failed", time.monotonic() - started
    LOGS.mkdir(exist_ok=True)
    (LOGS / f"{name}.log").write_text(output, encoding="utf-8")  # to tell a real catch from an unrelated failure
    return True, f"{failed[0]} (output: {LOGS / name}.log)", time.monotonic() - started


def main() -> None:
    names = sys.argv[1:] or list(MUTATIONS)
    survivors = 0
    for name in names:
        caught, detail, seconds = run(name)
        survivors += not caught
        print(f"{name:20} {'caught' if caught else 'SURVIVED':9} {seconds:6.0f} s  {detail}", flush=True)
    print(f"{len(names) - survivors} of {len(names)} mutations caught")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
