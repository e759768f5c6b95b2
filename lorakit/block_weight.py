"""LoRA Block Weight: an adapter applied at its own strength per U-Net block, and separately for the text encoders.

The vectors and presets are those of the webuis' LoRA Block Weight extension (hako-mikan's sd-webui-lora-block-weight,
also read by ComfyUI's Inspire pack), so a `lbw=` that looks right there draws the same here:

- a vector names blocks by the original (LDM) U-Net's numbering: BASE (every text encoder), IN00..IN11, M00,
  OUT00..OUT11 for SD 1.x/2.x (26 values; SDXL: IN00..IN08, M00, OUT00..OUT08, 20 values);
- a short vector lists only the blocks that hold attention layers (SD 1.x/2.x 17 values, SDXL 12), and the blocks it
  leaves out are at 0;
- the built-in presets are written as 17 values; on SDXL they apply by block name, as the extension applies them;
- U-Net modules outside the blocks (the time embedding, the output layer) keep strength 1; the input convolution is
  IN00.

Strengths are baked into a copy of the adapter's factors (a LoRA's up weights, a LoKr/LoHa module's first factor), so
every loader afterwards, diffusers included, draws the weighted adapter at its one strength.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .adapters import LoraModule, unet_block
from .errors import AdapterError
from .lycoris import LycorisModule
from .prompt_syntax import STRENGTH_LIMIT, is_number, step_range, tag_text


def _ids(prefix: str, numbers) -> list[str]:
    return [f"{prefix}{n:02d}" for n in numbers]


# Each vector length -> the block it gives a value to, in order.
LAYOUTS: dict[int, list[str]] = {
    26: ["BASE", *_ids("IN", range(12)), "M00", *_ids("OUT", range(12))],
    17: ["BASE", *_ids("IN", (1, 2, 4, 5, 7, 8)), "M00", *_ids("OUT", range(3, 12))],
    20: ["BASE", *_ids("IN", range(9)), "M00", *_ids("OUT", range(9))],
    12: ["BASE", *_ids("IN", (4, 5, 7, 8)), "M00", *_ids("OUT", range(6))],
}
FAMILY_LENGTHS = {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20)}

# The extension's built-in presets (17 values: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11).
PRESETS: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}


@dataclass(frozen=True)
class Strengths:
    """How one adapter is applied beyond its strength: the text encoders at `te`, the U-Net at `unet`, and each
    block at its value in `blocks` (a preset name or a vector, as written; empty: every block at 1)."""

    te: float = 1.0
    unet: float = 1.0
    blocks: str = ""
    start: int = 0  # start= / stop=: the denoising steps the U-Net part is drawn over (stop None: to the end)
    stop: int | None = None

    @property
    def plain(self) -> bool:
        """No strength of its own to bake in (a step range is applied while drawing, not baked)."""
        return self.te == 1 and self.unet == 1 and not self.blocks

    @property
    def stepped(self) -> bool:
        return self.start > 0 or self.stop is not None

    def tag(self, name: str, scale: float) -> str:
        """The webuis' tag that draws the adapter `name` at `scale` with these strengths."""
        return tag_text(name, self.te * scale, self.unet * scale, self.blocks, "lora", self.start, self.stop)

    def suffix(self) -> str:
        """`:lbw=SPEC` when blocks are weighted: what identifies the strengths in messages."""
        return f":lbw={self.blocks}" if self.blocks else ""


def split_strengths(text: str, scale_of, what: str) -> tuple[str, float, Strengths]:
    """`FILE[:SCALE][:lbw=SPEC][:te=X][:unet=Y][:start=A][:stop=B]` -> (FILE, scale, Strengths), with `scale_of`
    splitting `FILE[:SCALE]` into (FILE, SCALE). te= / unet= give the text encoders' / the U-Net's strength in place
    of SCALE (the scale is then 1 and both parts are baked into the adapter). ValueError, naming `what` (the option)
    and the value, for a te / unet that is not a number within the strength limit, a step range that is not one, or
    an option given twice."""
    given: dict[str, str] = {}
    rest = text
    while match := re.search(r":(lbw|te|unet|start|stop|step)=([^:]*)$", rest, flags=re.IGNORECASE):
        key = match[1].lower()
        if key in given:
            raise ValueError(f"{what} {text!r}: {key}= is given twice; give it once")
        given[key] = match[2].strip()
        rest = rest[: match.start()]
    path, scale = scale_of(rest)
    te, unet = (strength_value(given[k], f"{what} {text!r}: {k}=") if k in given else None for k in ("te", "unet"))
    try:
        start, stop = step_range(given.get("start"), given.get("stop"), given.get("step"))
    except ValueError as err:
        raise ValueError(f"{what} {text!r}: {err}") from None
    blocks = given.get("lbw", "")
    if te is None and unet is None:
        return path, scale, Strengths(blocks=blocks, start=start, stop=stop)
    return path, 1.0, Strengths(scale if te is None else te, scale if unet is None else unet, blocks, start, stop)


def strength_value(text: str, what: str) -> float:
    """One strength: a finite number within +-STRENGTH_LIMIT. ValueError naming `what` and the value."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or abs(value) > STRENGTH_LIMIT:
        raise ValueError(f"{what}{text}: give a number between -{STRENGTH_LIMIT:g} and {STRENGTH_LIMIT:g}")
    return value


def read_presets(path: str | Path) -> dict[str, str]:
    """The extension's presets file (`lbwpresets.txt`: a `NAME:v,v,...` line each, `#` lines are comments), by
    name. AdapterError, naming the file and line, for a line that is not a preset."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterError(f"--lbw-presets {path}: cannot be read ({type(err).__name__})") from None
    presets = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, values = line.partition(":")
        if not sep or not name.strip() or len(values.split(",")) not in LAYOUTS:
            raise AdapterError(
                f"--lbw-presets {path}, line {number}: {line[:60]!r} is not NAME:v,v,... with "
                f"{', '.join(map(str, sorted(LAYOUTS)))} values"
            )
        presets[name.strip()] = values.strip()
    return presets


def block_values(spec: str, family: str, presets: dict[str, str] | None = None) -> dict[str, float]:
    """A `lbw=` spec (a preset name or a vector) as block -> strength, every block of the 26-value layout and of the
    SDXL one present (the ones a short vector leaves out at 0). AdapterError names the spec and what is valid."""
    known = {**PRESETS, **(presets or {})}
    by_case = {name.upper(): values for name, values in known.items()}
    text = known.get(spec) or by_case.get(spec.upper(), spec)
    values = [v.strip() for v in text.split(",")]
    if len(values) == 1 and not is_number(values[0]):
        close = difflib.get_close_matches(spec, list(known), n=3, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"presets: {', '.join(known)}"
        raise AdapterError(f"lbw={spec}: not a preset or a list of block strengths; {hint}")
    lengths = FAMILY_LENGTHS.get(family, tuple(sorted(LAYOUTS)))
    if len(values) not in LAYOUTS or (text == spec and len(values) not in lengths):
        layouts = " or ".join(str(n) for n in lengths)
        raise AdapterError(
            f"lbw={spec}: {len(values)} values; a {_family_name(family)} adapter takes {layouts} (BASE, then the "
            "U-Net's blocks from IN to OUT)"
        )
    try:
        numbers = [strength_value(v, f"lbw={spec}: ") for v in values]
    except ValueError as err:
        raise AdapterError(str(err)) from None
    blocks = dict.fromkeys(LAYOUTS[26] + LAYOUTS[20], 0.0)
    blocks.update(zip(LAYOUTS[len(numbers)], numbers, strict=True))
    return blocks


def _family_name(family: str) -> str:
    from .formats.read import FAMILY_NAMES

    return FAMILY_NAMES.get(family, family)


def layers_per_block(state: dict, unet_config: dict | None = None) -> int:
    """The U-Net's layers per resolution, which decides the block of each module: the base's when known, else read
    from the adapter's own paths (an input resolution holds that many layers, an output one one more), else 2 (every
    Stable Diffusion U-Net)."""
    if unet_config is not None and isinstance(unet_config.get("layers_per_block"), int):
        return unet_config["layers_per_block"]
    found = []
    for path in state.get("unet", {}):
        if match := re.match(r"(down|up)_blocks\.\d+\.(?:attentions|resnets)\.(\d+)\.", path + "."):
            found.append(int(match[2]) + (1 if match[1] == "down" else 0))
    return max(found, default=2)


def block_of(component: str, path: str, layers: int) -> str | None:
    """The block a module's strength comes from: BASE for a text encoder, IN/M/OUT for a U-Net block, None for a U-Net
    module outside the blocks (it keeps strength 1)."""
    if component != "unet":
        return "BASE"
    if path.startswith("conv_in"):
        return "IN00"
    block = unet_block(path, layers)
    if block is None:
        return None
    kind, index = block
    return {"down": f"IN{index:02d}", "mid": "M00", "up": f"OUT{index:02d}"}[kind]


def weighted_state(
    state: dict,
    strengths: Strengths,
    source: str,
    family: str,
    *,
    unet_config: dict | None = None,
    presets: dict[str, str] | None = None,
):
    """A copy of `state` with each module's update multiplied by its strength (modules at 0 left out). AdapterError
    names `source` for a DoRA adapter (its magnitudes do not scale with a strength per module) and for strengths that
    leave nothing."""
    if strengths.plain:
        return state
    blocks = block_values(strengths.blocks, family, presets) if strengths.blocks else None
    layers = layers_per_block(state, unet_config)
    weighted: dict = {}
    for component, modules in state.items():
        for path, module in modules.items():
            block = block_of(component, path, layers)
            factor = strengths.te if component != "unet" else strengths.unet
            if blocks is not None and block is not None:
                factor *= blocks.get(block, 0.0)
            if factor == 0:
                continue
            weighted.setdefault(component, {})[path] = _scaled(module, factor, source)
    if not weighted:
        raise AdapterError(f"{source}{strengths.suffix()}: every module of the adapter is at strength 0")
    return weighted


def _scaled(module, factor: float, source: str):
    """One module whose update is `factor` times the original's."""
    if factor == 1:
        return module
    if isinstance(module, LycorisModule):  # the update is linear in the first factor of either kind
        key = next(k for k in ("lokr_w1", "lokr_w1_a", "hada_w1_a") if k in module.tensors)
        return replace(module, tensors={**module.tensors, key: module.tensors[key].float() * factor})
    if isinstance(module, LoraModule) and module.magnitude is not None:
        raise AdapterError(
            f"{source}: a DoRA module takes a strength of 0 or 1 per block and part (its magnitudes renormalise every "
            f"row), not {factor:g}; give 0 or 1 in lbw= / te= / unet=, or drop them"
        )
    return replace(module, up=module.up.to(torch.float32) * factor)
