"""Recipes: one frozen dataclass per TOML section, validated all at once.

`load_recipe(path, overrides)` reads a TOML file, applies `--set section.key=value` overrides and
returns a `Recipe`, or raises `RecipeError` listing every problem as `file: section.key: message`
with what is allowed. Defaults live only here. Each field's docstring documents it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import RecipeError

Optimizer = Literal["adamw8bit", "adamw", "adafactor", "prodigy"]
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
MixedPrecision = Literal["no", "fp16", "bf16"]
PredictionType = Literal["epsilon", "v_prediction"]
SaveDtype = Literal["float32", "float16", "bfloat16"]
TargetPreset = Literal["attention", "transformer", "transformer+conv"]
WeightDtype = Literal["float32", "float16", "bfloat16"]
LossType = Literal["l2", "huber", "smooth_l1"]
TokenLength = Literal[75, 150, 225]


@dataclass(frozen=True)
class ModelSection:
    base: str
    """The base model: a diffusers folder (local path) or a Hugging Face hub id. A value that exists on disk or starts
    with `./`, `/` or `~` is a local path and must exist."""
    prediction_type: PredictionType | None = None
    """What the U-Net predicts; read from the base model's scheduler when unset (SD 2.x 768 models use
    `v_prediction`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `base`; ignored for local folders."""
    config: str | None = None
    """For a single-file `base` (`.safetensors`): a diffusers folder or hub id of the same architecture whose
    component configs (and tokenizer) are used to read it."""
    vae: str | None = None
    """A replacement VAE (a diffusers AutoencoderKL folder or hub id), e.g. stabilityai/sd-vae-ft-mse."""
    weight_dtype: WeightDtype = "float32"
    """dtype of the frozen base weights: `float16` / `bfloat16` halve their memory (LoRA weights stay float32)."""
    clip_skip: int = 1
    """Use the output of the N-th last text-encoder layer (kohya's clip_skip: 2 for anime-style SD 1.x bases)."""


@dataclass(frozen=True)
class DataSection:
    folder: str | list[str] = "dataset"
    """The dataset folder written by `lorakit prepare` (images, `metadata.jsonl`), or a list of such folders."""
    resolution: int = 512
    """Training resolution in pixels; images are trained in aspect-ratio buckets of about this area."""
    num_repeats: int | list[int] = 1
    """How many times each image appears per epoch; a list gives each folder of `folder` its own."""
    trigger: str = ""
    """Trigger word(s) put at the front of every caption that does not already contain them."""
    shuffle_tags: bool = False
    """Shuffle the comma-separated tags of each caption every step (after the first `keep_tokens` tags)."""
    keep_tokens: int = 0
    """How many leading tags stay in place when `shuffle_tags` is on (kohya's name; counts tags, not tokens)."""
    caption_dropout: float = 0.0
    """Probability of training a step's image with an empty caption (0 to 1)."""
    flip: bool = False
    """Randomly mirror images left-right (do not use for asymmetric subjects such as text or faces with a parting)."""
    max_token_length: TokenLength = 75
    """Caption length in CLIP tokens: 75 truncates longer captions (counted and reported); 150 or 225 encode them
    in 75-token chunks, as kohya's max_token_length does."""


@dataclass(frozen=True)
class LoraSection:
    rank: int = 16
    """LoRA rank: the width of each adapter; larger learns more detail and makes bigger files."""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapter's update is scaled by `lora_alpha / rank`."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (0 to 1)."""
    target_modules: TargetPreset | list[str] = "transformer"
    """Where adapters go: `transformer` (every Linear and 1x1 conv in the U-Net's transformer blocks, and CLIP
    attention + MLP: kohya's default), `attention` (q/k/v/out only), `transformer+conv` (also the ResNet and
    resampler convolutions: LoCon), or a list of module names."""
    use_dora: bool = False
    """DoRA (peft's weight decomposition: a trained magnitude per output row on top of the low-rank direction).
    Saved in the diffusers layout only: A1111/Forge and ComfyUI apply kohya-layout DoRA on the other axis."""
    conv_rank: int | None = None
    """Rank of the 3x3 convolution adapters with `transformer+conv` (default: `rank`)."""
    conv_alpha: float | None = None
    """Alpha of the 3x3 convolution adapters with `transformer+conv` (default: `lora_alpha`)."""
    train_text_encoder: bool | None = None
    """Also adapt the text encoder(s); default true for SD 1.x and 2.x."""
    init_from: str | None = None
    """Start from an existing LoRA file (kohya or diffusers layout, same targets) instead of zero; not a resume."""


@dataclass(frozen=True)
class TrainSection:
    max_steps: int = 1000
    """Length of the run in optimizer steps (each of `batch_size x gradient_accumulation_steps` images per process)."""
    batch_size: int = 1
    """Images per micro-batch on each process; a batch always comes from one aspect-ratio bucket."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""
    unet_lr: float = 1e-4
    """Learning rate of the U-Net adapter."""
    text_encoder_lr: float = 5e-5
    """Learning rate of the text-encoder adapter(s)."""
    lr_scheduler: LrScheduler = "constant"
    """Learning-rate schedule over `max_steps`."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up at the start of the schedule."""
    optimizer: Optimizer = "adamw8bit"
    """`adamw8bit` (bitsandbytes, 8-bit state), `adamw`, `adafactor`, or `prodigy` (needs `pip install prodigyopt`;
    use learning rates of 1.0)."""
    weight_decay: float = 1e-2
    """Decoupled weight decay of the optimizer."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value; 0 turns clipping off."""
    mixed_precision: MixedPrecision = "no"
    """Autocast precision: `fp16` or `bf16` on CUDA; on a CPU, fp16 runs as bf16 (and says so)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    seed: int = 42
    """Seed of every random choice of the run (data order, noise, timesteps, initial adapter weights)."""
    min_snr_gamma: float = 0.0
    """Min-SNR loss weighting gamma (Hang et al. 2023, arXiv:2303.09556); 5 is typical, 0 turns it off."""
    noise_offset: float = 0.0
    """Offset noise strength (Guttenberg 2023): helps very dark and very bright images; 0.05-0.1 typical."""
    cache_latents: bool = True
    """Encode every image with the VAE once, cached under the dataset's `.cache/`, instead of every step."""
    log_every_steps: int = 1
    """Write a `metrics.jsonl` line (and a TensorBoard point) every this many optimizer steps."""
    save_every_steps: int = 500
    """Write a resumable checkpoint every this many steps (and always at the end); 0 writes only the final one."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the adapter weights with this decay (0.999 typical) and export it
    instead of the raw weights; 0 turns it off."""
    loss_type: LossType = "l2"
    """`l2` (mean squared error), `huber` or `smooth_l1` (less swayed by outlier pixels; see `huber_c`)."""
    huber_c: float = 0.1
    """Threshold of the huber / smooth_l1 losses."""
    min_timestep: int = 0
    """Lowest training timestep (inclusive)."""
    max_timestep: int | None = None
    """Highest training timestep (exclusive); default the scheduler's number of timesteps (1000)."""


@dataclass(frozen=True)
class PriorSection:
    class_dir: str
    """Folder of class images (e.g. photos of other people when training one person): prior preservation."""
    class_prompt: str | list[str]
    """Caption of the class images, e.g. "a photo of a person"; a list gives rendered class images these prompts in
    turn (each image keeps its prompt in a .txt beside it)."""
    num_class_images: int = 100
    """How many class images to use; the folder must hold at least this many."""
    prior_loss_weight: float = 1.0
    """Weight of the class images' loss relative to the instance images'."""


@dataclass(frozen=True)
class SampleSection:
    prompts: list[str] = field(default_factory=list)
    """Prompts rendered into `samples/step-NNNNNN.png` during training (one grid per save)."""
    every_steps: int = 0
    """Render samples every this many steps; 0 means at every checkpoint (`train.save_every_steps`)."""
    seed: int = 0
    """Seed of the first sample image; image i uses seed + i."""
    steps: int = 20
    """Denoising steps per sample."""
    guidance: float = 7.0
    """Classifier-free guidance scale."""
    negative_prompt: str = ""
    """Negative prompt of every sample."""


@dataclass(frozen=True)
class ValidationSection:
    folder: str
    """A held-out dataset folder (same layout as `data.folder`) whose denoising loss is logged as `val_loss`."""
    every_steps: int = 100
    """Compute the validation loss every this many steps (and at the end)."""
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """The fixed timesteps the validation loss is averaged over; the noise is fixed too."""


@dataclass(frozen=True)
class OutputSection:
    folder: str = "output"
    """Parent folder of run folders."""
    name: str = "lora"
    """Run name: the run folder is `<folder>/<name>/`, the adapter `<name>.safetensors`."""
    save_dtype: SaveDtype = "float16"
    """dtype of the exported adapter files."""


@dataclass(frozen=True)
class Recipe:
    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)
    prior: PriorSection | None = None
    sample: SampleSection = field(default_factory=SampleSection)
    validation: ValidationSection | None = None
    source: str = "<recipe>"
    """Where the recipe was read from (for messages)."""


SECTIONS: dict[str, type] = {
    name: next(a for a in typing.get_args(tp) if a is not type(None)) if typing.get_args(tp) else tp
    for name, tp in typing.get_type_hints(Recipe).items()
    if name != "source"
}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _describe(tp: object) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return "a list of " + {str: "strings", int: "integers"}[typing.get_args(tp)[0]]
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: object, tp: object) -> tuple[bool, object]:
    """(ok, value converted to `tp`): ints are accepted where floats are; nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        (element,) = typing.get_args(tp)
        ok = isinstance(value, list) and all(_coerce(v, element)[0] for v in value)
        return ok, value
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if isinstance(
            value, (int, float)
        ) else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, tp), value


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.resolution": (8, None),
    "data.num_repeats": (1, None),
    "data.keep_tokens": (0, None),
    "data.caption_dropout": (0, 1),
    "model.clip_skip": (1, None),
    "lora.conv_rank": (1, None),
    "lora.conv_alpha": (0, None),
    "train.save_every_steps": (0, None),
    "train.keep_checkpoints": (1, None),
    "train.ema_decay": (0, 0.999999),
    "train.huber_c": (0, None),
    "train.min_timestep": (0, None),
    "train.max_timestep": (1, None),
    "prior.num_class_images": (1, None),
    "prior.prior_loss_weight": (0, None),
    "sample.every_steps": (0, None),
    "sample.steps": (1, None),
    "sample.guidance": (0, None),
    "validation.every_steps": (1, None),
    "lora.rank": (1, None),
    "lora.lora_alpha": (0, None),
    "lora.dropout": (0, 1),
    "train.max_steps": (1, None),
    "train.batch_size": (1, None),
    "train.gradient_accumulation_steps": (1, None),
    "train.unet_lr": (0, None),
    "train.text_encoder_lr": (0, None),
    "train.lr_warmup_steps": (0, None),
    "train.weight_decay": (0, None),
    "train.max_grad_norm": (0, None),
    "train.min_snr_gamma": (0, None),
    "train.noise_offset": (0, None),
    "train.log_every_steps": (1, None),
}


def _check_range(key: str, value: object) -> str | None:
    low, high = _RANGES.get(key, (None, None))
    if isinstance(value, list):
        return next(filter(None, (_check_range(key, v) for v in value)), None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if low is not None and value < low:
            return f"{value} is below the minimum {low}"
        if high is not None and value > high:
            return f"{value} is above the maximum {high}"
    return None


def _build_section(name: str, cls: type, raw: object, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{name}: must be a table ([{name}]), got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{name}.{key}: unknown key{_suggest(key, list(fields))}; valid keys: {', '.join(fields)}")
            continue
        ok, converted = _coerce(value, hints[key])
        if not ok:
            choices = [
                str(c)
                for a in (hints[key], *typing.get_args(hints[key]))
                if typing.get_origin(a) is Literal
                for c in typing.get_args(a)
            ]
            hint = _suggest(value, choices) if isinstance(value, str) else ""
            problems.append(f"{name}.{key}: {value!r} is not {_describe(hints[key])}{hint}")
            continue
        out_of_range = _check_range(f"{name}.{key}", converted)
        if out_of_range:
            problems.append(f"{name}.{key}: {out_of_range}")
            continue
        values[key] = converted
    missing = [
        k
        for k, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and k not in raw
    ]
    for key in missing:
        problems.append(f"{name}.{key}: required; {_describe(hints[key])}")
    if len(values) != len(raw) or missing:
        return None
    return cls(**values)


def parse_override(text: str) -> tuple[str, str, object]:
    """Parse one `section.key=value` override; the value is TOML (`5`, `true`, `"x"`, `[...]`) or a bare string."""
    key, sep, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. --set train.max_steps=500")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return section, name, parsed


def _cross_checks(built: dict, problems: list[str]) -> None:
    """Checks that involve more than one key (only on sections that were themselves valid)."""
    lora, data, train = built.get("lora"), built.get("data"), built.get("train")
    if lora is not None:
        if isinstance(lora.target_modules, list) and not lora.target_modules:
            problems.append("lora.target_modules: the list is empty; name modules or use 'transformer'")
        for key in ("conv_rank", "conv_alpha"):
            if getattr(lora, key) is not None and lora.target_modules != "transformer+conv":
                problems.append(f"lora.{key}: only used with target_modules = 'transformer+conv'")
    if data is not None:
        folders = [data.folder] if isinstance(data.folder, str) else data.folder
        if not folders:
            problems.append("data.folder: the list is empty; name at least one dataset folder")
        if isinstance(data.num_repeats, list) and len(data.num_repeats) != len(folders):
            problems.append(
                f"data.num_repeats: {len(data.num_repeats)} values for {len(folders)} folders; "
                "give one per folder in data.folder, or a single number"
            )
    if train is not None and train.max_timestep is not None and train.max_timestep <= train.min_timestep:
        problems.append(
            f"train.max_timestep: {train.max_timestep} must be above train.min_timestep ({train.min_timestep})"
        )


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as nested dicts (what TOML gives) and build it."""
    problems: list[str] = []
    for section in data:
        if section not in SECTIONS:
            problems.append(
                f"{section}: unknown section{_suggest(section, list(SECTIONS))}; valid sections: {', '.join(SECTIONS)}"
            )
    if "model" not in data:
        problems.append('model: required section; add [model] with base = "<diffusers folder or hub id>"')
    built = {}
    for section, cls in SECTIONS.items():
        if section in data:
            built[section] = _build_section(section, cls, data[section], problems)
    _cross_checks(built, problems)
    if problems:
        raise RecipeError("\n".join(f"{source}: {p}" for p in problems))
    return Recipe(**{k: v for k, v in built.items()}, source=source)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file; every problem is reported in one RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe not found; pass a .toml file such as recipes/character.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not valid TOML: {err}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"{path}: {section}: must be a table to take --set {text!r}")
        table[key] = value
    return recipe_from_dict(data, source=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    """The fully-defaulted recipe as nested dicts (None values left out, as TOML has no null)."""
    out = {}
    for name in SECTIONS:
        section = getattr(recipe, name)
        if section is not None:
            out[name] = {k: v for k, v in dataclasses.asdict(section).items() if v is not None}
    return out


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as TOML text that `load_recipe` reads back to an equal `Recipe`."""
    lines = []
    for name, values in recipe_to_dict(recipe).items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return "unset" if value is None else f"`{toml_value(value)}`"


def reference_markdown() -> str:
    """The recipe key reference (README's "Recipe keys"), generated from the field docstrings."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"| `{name}.{f.name}` | {_default_text(f)} | {docs[f.name].replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
