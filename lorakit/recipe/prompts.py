"""Sample prompts with kohya's inline options: `a photo of ohwx man --n blurry --w 512 --h 768 --d 7 --s 28 --l 6`.

kohya sd-scripts reads prompt files in this form; `[sample] prompts` takes the same lines, so a kohya user's
prompts keep their negative prompt, size, seed, steps and guidance. An option not given falls back to the
`[sample]` section (size: `data.resolution`, seed: `sample.seed` + the prompt's index). `--m` is ai-toolkit's: the
strength of the adapter in that image (1 when not given), e.g. `--m -2` for the other end of a slider.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..prompt_syntax import STRENGTH_LIMIT

OPTIONS = {
    "n": "negative prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "steps",
    "l": "guidance",
    "m": "adapter strength",
}
SIZE_RANGE = (8, 4096)  # as data.resolution (the toy world draws 16 x 16)
STEPS_RANGE = (1, 1000)
GUIDANCE_RANGE = (0.0, 100.0)
SEED_MAX = 2**32 - 1
_OPTION = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")


@dataclass(frozen=True)
class SamplePrompt:
    """One sample prompt and the options it sets itself (None: the `[sample]` section's value)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None


def _whole(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--{name} {text!r} is not a whole number") from None
    if not low <= value <= high:
        raise ValueError(f"--{name} {value} is outside {low} to {high}")
    return value


def parse_sample_prompt(text: str) -> SamplePrompt:
    """Split kohya's inline options off a prompt. Raises ValueError naming the option and what it takes."""
    marks = list(_OPTION.finditer(text))
    prompt = (text[: marks[0].start()] if marks else text).strip()
    values: dict[str, object] = {}
    for index, mark in enumerate(marks):
        name = mark.group(1)
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        value = text[mark.end() : end].strip()
        if name not in OPTIONS:
            known = ", ".join(f"--{k} ({v})" for k, v in OPTIONS.items())
            raise ValueError(f"--{name} is not a sample prompt option; use {known}")
        if name in values:
            raise ValueError(f"--{name} is given twice")
        if not value and name != "n":
            raise ValueError(f"--{name} needs a value")
        if name == "n":
            values["negative_prompt"] = value
        elif name in ("w", "h"):
            size = _whole(value, name, *SIZE_RANGE)
            if size % 8:
                raise ValueError(f"--{name} {size} is not a multiple of 8 (the VAE halves the image three times)")
            values["width" if name == "w" else "height"] = size
        elif name == "d":
            values["seed"] = _whole(value, name, 0, SEED_MAX)
        elif name == "s":
            values["steps"] = _whole(value, name, *STEPS_RANGE)
        elif name == "m":
            try:
                strength = float(value)
            except ValueError:
                raise ValueError(f"--m {value!r} is not a number") from None
            if not math.isfinite(strength) or abs(strength) > STRENGTH_LIMIT:
                raise ValueError(f"--m {value} is outside -{STRENGTH_LIMIT:g} to {STRENGTH_LIMIT:g}")
            values["strength"] = strength
        else:
            try:
                guidance = float(value)
            except ValueError:
                raise ValueError(f"--l {value!r} is not a number") from None
            if not math.isfinite(guidance) or not GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1]:
                raise ValueError(f"--l {value} is outside {GUIDANCE_RANGE[0]:g} to {GUIDANCE_RANGE[1]:g}")
            values["guidance"] = guidance
    if not prompt:
        raise ValueError("the prompt before its options is empty")
    return SamplePrompt(prompt, **values)
