"""Building a `Recipe` from TOML data: types, enums, ranges and cross-field checks, every problem reported at once
as `file: section.key: message` with what is allowed (and "did you mean" for typos)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Literal

from ..errors import RecipeError
from ..prompt_syntax import network_tag
from ..trigger import contains_trigger
from .prompts import parse_sample_prompt
from .sections import SECTIONS, Recipe


def _describe(tp: object) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        (element,) = typing.get_args(tp)
        if typing.get_origin(element) is Literal:
            return "a list of " + ", ".join(repr(v) for v in typing.get_args(element))
        return "a list of " + {str: "strings", int: "integers", float: "finite numbers"}[element]
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))


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
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False, value
        try:
            converted = float(value)
        except OverflowError:  # an integer too large for a float
            return False, value
        return math.isfinite(converted), converted
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, tp), value


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


RECIPE_MAX_BYTES = 1 << 20
STEPS_MAX = 10_000_000  # steps and step counts: far past any LoRA run, and well inside every integer type
TIMESTEPS_MAX = 100_000  # schedules have 1,000 steps; train checks the base's own count
SEED_MAX = 2**32 - 1  # 32-bit seeds, as kohya's tools and diffusers' examples use

# Every number of a recipe has a finite range (tests/test_untrusted_input.py checks none is missing): what it is
# for, not what a type can hold. Floats must also be finite (NaN and infinity are refused before the range).
_RANGES: dict[str, tuple[float, float]] = {
    "model.clip_skip": (1, 32),
    "data.resolution": (8, 4096),
    "data.extra_resolutions": (8, 4096),
    "data.num_repeats": (1, 10_000),
    "data.adapter_strength": (-100, 100),
    "data.keep_tokens": (0, 1_000),
    "data.caption_warmup_steps": (0, STEPS_MAX),
    "data.caption_warmup_min": (0, 1_000),
    "data.caption_dropout": (0, 1),
    "data.caption_dropout_every_epochs": (0, 100_000),
    "data.caption_dropout_tags": (0, 1),
    "data.mask_background_weight": (0, 1),
    "lora.rank": (1, 4096),
    "lora.lora_alpha": (0, 65_536),
    "lora.dropout": (0, 1),
    "lora.neuron_dropout": (0, 0.99),
    "lora.rank_dropout": (0, 0.99),
    "lora.module_dropout": (0, 0.99),
    "lora.decompose_factor": (-1, 4096),
    "lora.conv_rank": (1, 4096),
    "lora.conv_alpha": (0, 65_536),
    "lora.block_ranks": (0, 4096),
    "lora.block_alphas": (0, 65_536),
    "lora.conv_block_ranks": (0, 4096),
    "lora.conv_block_alphas": (0, 65_536),
    "lora.tlora_min_rank": (1, 4096),
    "lora.tlora_exponent": (0.1, 10),
    "train.max_steps": (1, STEPS_MAX),
    "train.max_epochs": (1, 100_000),
    "train.save_every_epochs": (0, 100_000),
    "train.save_every_minutes": (0, 100_000),
    "train.lr_scheduler_num_cycles": (1, 10_000),
    "train.lr_scheduler_power": (0.01, 100),
    "train.lr_scheduler_min_lr_ratio": (0, 1),
    "train.lr_decay_steps": (0, STEPS_MAX),
    "train.lr_scheduler_timescale": (1, STEPS_MAX),
    "train.batch_size": (1, 4096),
    "train.gradient_accumulation_steps": (1, 4096),
    "train.unet_lr": (0, 1),
    "train.text_encoder_lr": (0, 1),
    "train.text_encoder_2_lr": (0, 1),
    "train.text_encoder_until": (0.001, 1),
    "train.lr_warmup_steps": (0, STEPS_MAX),
    "train.weight_decay": (0, 10),
    "train.betas": (0, 0.9999),
    "train.prodigy_d_coef": (0.001, 1000),
    "train.max_grad_norm": (0, 1e6),
    "train.seed": (0, SEED_MAX),
    "train.min_snr_gamma": (0, 1_000),
    "train.noise_offset": (0, 1),
    "train.adaptive_noise_scale": (-1, 1),
    "train.multires_noise_iterations": (0, 20),
    "train.multires_noise_discount": (0, 1),
    "train.ip_noise_gamma": (0, 1),
    "train.v_pred_like_loss": (0, 10),
    "train.log_every_steps": (1, STEPS_MAX),
    "train.save_every_steps": (0, STEPS_MAX),
    "train.keep_checkpoints": (1, 10_000),
    "train.ema_decay": (0, 0.999999),
    "preservation.weight": (0, 100),
    "slider.guidance": (0.01, 100),
    "slider.weight": (0.001, 100),
    "slider.denoise_steps": (3, 1000),
    "train.huber_c": (1e-6, 1_000),
    "train.huber_scale": (1e-6, 1_000),
    "train.min_timestep": (0, TIMESTEPS_MAX),  # the base's own schedule is checked once it is loaded
    "train.max_timestep": (1, TIMESTEPS_MAX),
    "train.timestep_bias_multiplier": (0, 100),
    "train.timestep_bias_portion": (0.001, 1),
    "train.timestep_bias_begin": (0, TIMESTEPS_MAX),
    "train.timestep_bias_end": (1, TIMESTEPS_MAX),
    "train.loraplus_lr_ratio": (1, 1000),
    "train.loraplus_unet_lr_ratio": (1, 1000),
    "train.loraplus_text_encoder_lr_ratio": (1, 1000),
    "train.scale_weight_norms": (1e-6, 1e6),
    "train.down_lr_weight": (0, 100),
    "train.mid_lr_weight": (0, 100),
    "train.up_lr_weight": (0, 100),
    "train.block_lr_zero_threshold": (0, 100),
    "prior.num_class_images": (1, 100_000),
    "embedding.vectors": (1, 16),
    "embedding.lr": (0, 1),
    "embedding.train_until": (0.001, 1),
    "prior.prior_loss_weight": (0, 1_000),
    "sample.every_steps": (0, STEPS_MAX),
    "sample.every_epochs": (0, 100_000),
    "sample.seed": (0, SEED_MAX),
    "sample.steps": (1, 1000),
    "sample.guidance": (0, 100),
    "validation.every_steps": (0, STEPS_MAX),
    "validation.every_epochs": (0, 100_000),
    "validation.seed": (0, SEED_MAX),
    "validation.split": (0, 0.9),
    "validation.timesteps": (0, TIMESTEPS_MAX),
}


def range_problem(key: str, value: object) -> str | None:
    """Why `value` is outside the range of the recipe key `key` (None when it is inside, or the key has none)."""
    if key not in _RANGES:
        return None
    low, high = _RANGES[key]
    if isinstance(value, list):
        return next(filter(None, (range_problem(key, v) for v in value)), None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not low <= value <= high:
            return f"{_short(value)} is outside {low:g}..{high:g}"
    return None


def _short(value: object) -> str:
    """A value for a message, cut to 40 characters (a 5,000-digit number is not worth echoing)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
            problems.append(f"{name}.{key}: {_short(value)} is not {_describe(hints[key])}{hint}")
            continue
        out_of_range = range_problem(f"{name}.{key}", converted)
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
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):  # ValueError: an integer past 4,300 digits
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
        problems += _adapter_type_problems(lora, train)
        model = built.get("model")
        if model is not None and not model.float8_text_encoders and model.weight_dtype != "float8":
            problems.append(
                'model.float8_text_encoders: chooses what weight_dtype = "float8" stores; set that too, or remove it'
            )
        if lora.use_dora and model is not None and model.weight_dtype == "float8":
            problems.append(
                'model.weight_dtype: "float8" with DoRA, which reads the frozen weights themselves to size each row; '
                'set lora.use_dora = false or weight_dtype = "bfloat16" / "float16"'
            )
    if data is not None and train is not None and data.color_aug and train.cache_latents:
        problems.append(
            "data.color_aug: changes the images' colours at every step, and train.cache_latents encodes each image "
            "once; set train.cache_latents = false (each step then encodes its images with the VAE)"
        )
    if data is not None and train is not None and data.random_crop and train.cache_latents:
        problems.append(
            "data.random_crop: crops each image at another place at every step, and train.cache_latents encodes "
            "each image once; set train.cache_latents = false (each step then encodes its images with the VAE)"
        )
    if data is not None:
        folders = [data.folder] if isinstance(data.folder, str) else data.folder
        if not folders:
            problems.append("data.folder: the list is empty; name at least one dataset folder")
        separator = data.keep_tokens_separator
        if separator and (not separator.strip() or "," in separator):
            problems.append(
                f"data.keep_tokens_separator: {separator!r} cannot mark where tags end (captions are split at "
                'commas); use a string of its own such as "|||"'
            )
        extra = data.extra_resolutions
        if data.resolution in extra or len(set(extra)) != len(extra):
            problems.append(
                f"data.extra_resolutions: {extra} repeats a resolution (data.resolution is {data.resolution}); give "
                "each other resolution once"
            )
        problems += _strength_problems(data, lora, len(folders), built.get("preservation"), built.get("embedding"))
        if data.pairs:
            problems += _pair_problems(data, train, built.get("validation"), built.get("prior"), len(folders))
        if isinstance(data.num_repeats, list) and len(data.num_repeats) != len(folders):
            problems.append(
                f"data.num_repeats: {len(data.num_repeats)} values for {len(folders)} folders; "
                "give one per folder in data.folder, or a single number"
            )
    output = built.get("output")
    if output is not None:
        problems += _run_name_problems(output.name)
        problems += _tracker_problems(output)
    validation = built.get("validation")
    if validation is not None and validation.seed is not None and not validation.split:
        problems.append(
            "validation.seed: chooses the images validation.split holds out; set split (e.g. 0.1) or remove it"
        )
    if validation is not None and (validation.folder is None) == (not validation.split):
        problems.append(
            "validation: give folder (a held-out dataset folder) or split (a share of data.folder's images to hold "
            "out, e.g. 0.1), not both"
            if validation.folder is not None
            else "validation: give folder (a held-out dataset folder) or split (a share of data.folder's images to "
            "hold out, e.g. 0.1)"
        )
    for key in ("down_lr_weight", "up_lr_weight"):
        values = getattr(train, key) if train is not None else None
        if values is not None and not values:
            problems.append(
                f"train.{key}: the list is empty; give one factor from 0 to 100 per U-Net block (12 for SD 1.x/2.x, "
                "9 for SDXL)"
            )
    sample = built.get("sample")
    if sample is not None and sample.at_first and not sample.prompts:
        problems.append(
            'sample.at_first: there are no sample.prompts to render; add some, e.g. prompts = ["ohwx '
            'man at the beach"], or remove it'
        )
    for where, text in [
        *((f"sample.prompts[{i}]", t) for i, t in enumerate(sample.prompts if sample is not None else [])),
        ("sample.negative_prompt", sample.negative_prompt if sample is not None else ""),
    ]:
        if (tag := network_tag(text)) is not None:
            problems.append(
                f"{where}: the webui tag {tag} would be encoded as words; remove it (samples use the adapter being "
                "trained, and model.merged_adapters for others)"
            )
    only = built.get("embedding") is not None and built["embedding"].only
    for index, text in enumerate(sample.prompts if sample is not None else []):
        try:
            parsed = parse_sample_prompt(text)
        except ValueError as err:
            problems.append(f"sample.prompts[{index}]: {err} (in {text[:60]!r})")
            continue
        if only and parsed.strength is not None:
            problems.append(
                f"sample.prompts[{index}]: --m sets the strength of a LoRA, and embedding.only trains none; remove it"
            )
    if train is not None and train.multires_noise_iterations and train.noise_offset:
        problems.append(
            "train.multires_noise_iterations: not together with train.noise_offset (both reshape the noise, and "
            "multi-resolution noise already moves the overall brightness); set one of them to 0"
        )
    if train is not None:
        problems += _schedule_problems(train) + _block_curve_problems(train)
        if train.full_bf16 and train.mixed_precision != "bf16":
            problems.append(
                f'train.full_bf16: needs train.mixed_precision = "bf16" (it is "{train.mixed_precision}"), as in '
                "kohya sd-scripts; set it, or remove full_bf16"
            )
        if train.stochastic_rounding and not train.full_bf16:
            problems.append(
                "train.stochastic_rounding: rounds the bfloat16 weights of train.full_bf16, and this recipe trains in "
                "float32; set train.full_bf16 = true, or remove stochastic_rounding"
            )
        for key in ("noise_offset_random_strength", "adaptive_noise_scale"):
            if _not_default(train, key) and not train.noise_offset:
                problems.append(
                    f"train.{key}: shapes the offset noise; set train.noise_offset (0.05-0.1) or remove it"
                )
        if train.ip_noise_gamma_random_strength and not train.ip_noise_gamma:
            problems.append(
                "train.ip_noise_gamma_random_strength: shapes the input perturbation; set train.ip_noise_gamma "
                "(about 0.1) or remove it"
            )
    embedding = built.get("embedding")
    if embedding is not None and embedding.only:
        problems += _embedding_only_problems(embedding, built.get("lora"), train)
    if embedding is not None and not re.fullmatch(r"\w+", embedding.token):
        problems.append(
            f"embedding.token: {embedding.token!r} is not one word; give the trigger word of the captions, e.g. "
            '"ohwx" (letters, digits and underscores)'
        )
    preservation = built.get("preservation")
    if preservation is not None:
        problems += _preservation_problems(preservation, data, embedding)
    slider = built.get("slider")
    if slider is not None:
        problems += _slider_problems(slider, built)
    if train is not None and train.max_timestep is not None and train.max_timestep <= train.min_timestep:
        problems.append(
            f"train.max_timestep: {train.max_timestep} must be above train.min_timestep ({train.min_timestep})"
        )


LORAPLUS_RATIOS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
ADAPTER_RATES = (
    "unet_lr",
    "text_encoder_lr",
    "text_encoder_2_lr",
    "text_encoder_until",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
    "scale_weight_norms",
)


def _preservation_problems(preservation, data, embedding) -> list[str]:
    """[preservation] replaces the trigger of each caption with the class word, and preserves what a LoRA changes."""
    problems = []
    if not preservation.class_word.strip():
        problems.append('preservation.class_word: empty; give what the trigger is, e.g. "person"')
    if data is not None and not data.trigger.strip():
        problems.append(
            "preservation.class_word: replaces data.trigger in each caption, and the recipe sets none; set "
            'data.trigger (e.g. "ohwx person")'
        )
    elif data is not None and contains_trigger(preservation.class_word, data.trigger.strip()):
        problems.append(
            f"preservation.class_word: {preservation.class_word!r} holds data.trigger {data.trigger.strip()!r}, so "
            'the class captions would keep it; give what the trigger stands for without it, e.g. "person"'
        )
    if embedding is not None and embedding.only:
        problems.append(
            "preservation: embedding.only trains no adapter whose output could drift; remove [preservation]"
        )
    return problems


def _strength_problems(data, lora, folders: int, preservation, embedding) -> list[str]:
    """`data.adapter_strength`: one per folder, none at 0, and an adapter whose strength -1 undoes +1."""
    strength = data.adapter_strength
    if isinstance(strength, list) and len(strength) != folders:
        return [
            f"data.adapter_strength: {len(strength)} values for {folders} folders; give one per folder in "
            "data.folder, or a single number"
        ]
    if isinstance(strength, list) and not strength:
        return []
    problems = []
    if 0 in data.strengths:
        problems.append(
            "data.adapter_strength: 0 switches the adapter off for that folder's images, which then teach it "
            "nothing; give a strength such as -1, or leave the folder out"
        )
    if not data.strengths_vary:
        return problems
    if lora is not None and (lora.type != "lora" or lora.use_dora):
        kind = "DoRA" if lora.type == "lora" else {"lokr": "LoKr", "loha": "LoHa"}[lora.type]
        problems.append(
            f"data.adapter_strength: scales a LoRA's output per image, which {kind} does not have as one factor; "
            'use lora.type = "lora" without DoRA, or strength 1'
        )
    if embedding is not None and embedding.only:
        problems.append(
            "data.adapter_strength: sets the strength of a LoRA, and embedding.only trains none; remove it"
        )
    if preservation is not None:
        problems.append(
            "data.adapter_strength: not with [preservation], which trains the class captions at strength 1 beside "
            "them; remove one"
        )
    return problems


def _pair_problems(data, train, validation, prior, folders: int) -> list[str]:
    """`data.pairs`: two folders at two strengths, repeated alike, and batches that hold whole pairs."""
    problems = []
    if folders != 2:
        problems.append(f"data.pairs: pairs the photos of two folders, and data.folder names {folders}; give two")
    elif data.strengths[0] == data.strengths[1]:
        problems.append(
            "data.pairs: both folders train at the same adapter strength, so a pair teaches no difference; set "
            "data.adapter_strength = [1.0, -1.0]"
        )
    repeats = data.num_repeats
    if isinstance(repeats, list) and len(set(repeats)) > 1:
        problems.append(f"data.pairs: data.num_repeats {repeats} would show one photo of a pair more often; give one")
    if train is not None and train.batch_size % 2:
        problems.append(
            f"data.pairs: train.batch_size {train.batch_size} cannot hold whole pairs; use an even size (2 is one "
            "pair per batch)"
        )
    if validation is not None and validation.split:
        problems.append(
            "data.pairs: validation.split would hold out one photo of a pair; use validation.folder, or remove it"
        )
    if prior is not None:
        problems.append("data.pairs: [prior]'s class images have no pair; remove one of them")
    return problems


# What a [slider] keeps of the image-training keys: the sizes it draws at, and how long its prompts may be.
SLIDER_DATA_KEYS = ("resolution", "extra_resolutions", "max_token_length")
# Keys a [slider] has no use for: it trains no epochs of images, and its timestep is where the base's denoising
# of pure noise stopped, not a draw.
SLIDER_TRAIN_KEYS = {
    "max_epochs": "it has no images to count epochs of; use train.max_steps",
    "save_every_epochs": "it has no epochs; use train.save_every_steps",
    "cache_latents": "it encodes no images",
    "adaptive_noise_scale": "it scales the offset noise by a clean image's brightness, and a slider has none",
    "ip_noise_gamma": "its noisy latents come from the base's denoising, with no noise added to a clean image",
    "ip_noise_gamma_random_strength": "its noisy latents come from the base's denoising",
    **dict.fromkeys(
        (
            "min_timestep",
            "max_timestep",
            "timestep_bias",
            "timestep_bias_multiplier",
            "timestep_bias_portion",
            "timestep_bias_begin",
            "timestep_bias_end",
        ),
        "its timestep is where the base's denoising stopped (slider.denoise_steps)",
    ),
}


def _slider_problems(slider, built: dict) -> list[str]:
    """[slider] learns from prompts alone, as a LoRA whose sign flips its effect: the keys that need images or
    another adapter, and two ends that are the same."""
    problems = []
    lists = {
        key: len(v) for key in ("target_class", "positive", "negative") if isinstance(v := getattr(slider, key), list)
    }
    if any(count == 0 for count in lists.values()):
        empty = next(key for key, count in lists.items() if not count)
        problems.append(f"slider.{empty}: the list is empty; give one prompt per target, or a single prompt")
        return problems
    if len(set(lists.values())) > 1:
        said = ", ".join(f"{key} {count}" for key, count in lists.items())
        problems.append(
            f"slider: lists of {said} prompts; give every list one prompt per target (the same length), or a single "
            "prompt for all"
        )
        return problems
    several = len(slider.targets) > 1
    if isinstance(slider.weight, list) and len(slider.weight) != len(slider.targets):
        problems.append(
            f"slider.weight: {len(slider.weight)} weights for {len(slider.targets)} targets; give one per target, or "
            "a single number"
        )
    for number, (target, positive, negative) in enumerate(slider.targets, start=1):
        if positive.strip() == negative.strip():
            problems.append(
                "slider.positive: "
                + (f"target {number} ({target!r}): " if several else "")
                + "the same as slider.negative"
                + (" (both empty)" if not positive.strip() else "")
                + '; give the two ends of the slider, e.g. positive = "a very old person", negative = "a very young '
                'person"'
            )
        for key, text in (("target_class", target), ("positive", positive), ("negative", negative)):
            if (tag := network_tag(text)) is not None:
                problems.append(
                    f"slider.{key}: the webui tag {tag} would be encoded as words; remove it (use "
                    "model.merged_adapters to train on top of another adapter)"
                )
    for section in ("prior", "validation", "preservation", "embedding"):
        if built.get(section) is not None:
            problems.append(f"{section}: a [slider] trains from its prompts, with no images; remove [{section}]")
    lora, data, train, sample = (built.get(name) for name in ("lora", "data", "train", "sample"))
    if lora is not None and lora.type != "lora":
        problems.append(
            f'lora.type: a slider is a LoRA whose strength -1 is the opposite of +1; set lora.type = "lora" '
            f"(not {lora.type!r})"
        )
    if lora is not None and lora.use_dora:
        problems.append(
            "lora.use_dora: DoRA's magnitude does not flip with the strength, so -1 would not be the opposite of +1; "
            "set lora.use_dora = false"
        )
    if data is not None:
        problems += [
            f"data.{f.name}: a [slider] trains from its prompts, with no images (of data it reads only "
            f"{', '.join(SLIDER_DATA_KEYS)}); remove it"
            for f in dataclasses.fields(data)
            if f.name not in SLIDER_DATA_KEYS and _not_default(data, f.name)
        ]
    if train is not None:
        problems += [
            f"train.{key}: not with [slider]: {why}; remove it"
            for key, why in SLIDER_TRAIN_KEYS.items()
            if _not_default(train, key)
        ]
    if sample is not None and sample.every_epochs:
        problems.append("sample.every_epochs: a [slider] has no epochs; use sample.every_steps")
    return list(dict.fromkeys(problems))  # a prompt shared by several targets is named once


def _embedding_only_problems(embedding, lora, train) -> list[str]:
    """`embedding.only` trains no LoRA: the settings that would shape one, and a freeze that leaves nothing."""
    problems = []
    if embedding.train_until < 1:
        problems.append(
            f"embedding.train_until: {embedding.train_until:g} would freeze the vectors, and with embedding.only "
            "nothing else trains; remove it"
        )
    if lora is not None:
        problems += [
            f"lora.{f.name}: embedding.only trains no LoRA; remove it (or embedding.only)"
            for f in dataclasses.fields(lora)
            if _not_default(lora, f.name) and not (f.name == "train_text_encoder" and lora.train_text_encoder is False)
        ]
    if train is not None:
        problems += [
            f"train.{name}: a rate of the LoRA, which embedding.only does not train; use embedding.lr, or remove it"
            for name in ADAPTER_RATES
            if _not_default(train, name)
        ]
    return problems


BLOCK_CURVE = re.compile(r"(sine|cosine|linear|reverse_linear|zeros)(?:\+(\d+(?:\.\d*)?|\.\d+))?")


def block_curve(name: str, count: int) -> list[float]:
    """kohya's named block-wise rate curves over `count` blocks, first to last: `sine` rises from 0 to 1 along a
    quarter sine, `cosine` falls from 1 to 0, `linear` / `reverse_linear` rise or fall in a straight line, `zeros`
    is 0; "+0.5" adds 0.5 to every factor."""
    match = BLOCK_CURVE.fullmatch(name.strip())
    if match is None:
        raise ValueError(f"not a block-wise curve: {name!r}")
    kind, offset = match[1], float(match[2] or 0)
    steps = [i / (count - 1) for i in range(count)] if count > 1 else [0.0]
    shape = {
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "linear": steps,
        "reverse_linear": steps[::-1],
        "zeros": [0.0] * count,
    }[kind]
    return [value + offset for value in shape]


def _block_curve_problems(train) -> list[str]:
    """Block-wise rates given as kohya's curve names must be one of them, with an optional "+number"; a zero
    threshold needs block-wise rates to act on."""
    problems = []
    rates = (train.down_lr_weight, train.mid_lr_weight, train.up_lr_weight)
    if train.block_lr_zero_threshold and all(rate is None for rate in rates):
        problems.append(
            "train.block_lr_zero_threshold: acts on block-wise rates; set train.down_lr_weight / mid_lr_weight / "
            "up_lr_weight, or remove it"
        )
    return problems + [
        f"train.{key}: {value!r} is not one of kohya's curves; use sine, cosine, linear, reverse_linear or zeros, "
        'optionally with "+0.5" added, or a list of factors'
        for key in ("down_lr_weight", "up_lr_weight")
        if isinstance(value := getattr(train, key), str) and not BLOCK_CURVE.fullmatch(value.strip())
    ]


def _schedule_free_problems(train) -> list[str]:
    """Settings that schedule-free AdamW would make meaningless: a schedule (it has none; its warm-up is its own), an
    EMA (it keeps a running average already, and that is what it saves) and the weight-norm cap (the cap reaches the
    weights it steps at, not the average it saves)."""
    if train.optimizer != "adamw_schedulefree":
        return []
    problems = []
    if train.lr_scheduler not in ("constant", "constant_with_warmup"):
        problems.append(
            f"train.lr_scheduler: {train.lr_scheduler!r}, but schedule-free AdamW needs no schedule; set "
            'lr_scheduler = "constant" (train.lr_warmup_steps still warms it up)'
        )
    if train.ema_decay:
        problems.append(
            "train.ema_decay: schedule-free AdamW saves a running average of the weights already; remove ema_decay"
        )
    if train.scale_weight_norms is not None:
        problems.append(
            "train.scale_weight_norms: schedule-free AdamW saves an average that the cap does not reach; remove it or "
            'choose train.optimizer = "adamw"'
        )
    return problems


def _schedule_problems(train) -> list[str]:
    """Learning-rate schedule shapes that the chosen schedule would ignore, and optimizer settings that the chosen
    optimizer does not have."""
    problems = []
    if train.betas is not None and len(train.betas) != 2:
        problems.append(f"train.betas: {len(train.betas)} values; give two, e.g. betas = [0.9, 0.999]")
    if train.betas is not None and train.optimizer == "adafactor":
        problems.append("train.betas: Adafactor keeps no momentum here; remove it or choose another optimizer")
    for key in ("huber_schedule", "huber_scale"):
        if _not_default(train, key) and train.loss_type in ("l2", "l1"):
            problems.append(
                f'train.{key}: shapes the huber / smooth_l1 threshold; set train.loss_type = "huber" or '
                '"smooth_l1", or remove it'
            )
    if train.huber_schedule == "snr" and _not_default(train, "huber_scale"):
        problems.append("train.huber_scale: the snr schedule does not use it (as in kohya); remove it")
    for key in ("prodigy_d_coef", "prodigy_use_bias_correction", "prodigy_safeguard_warmup"):
        if _not_default(train, key) and train.optimizer != "prodigy":
            problems.append(
                f"train.{key}: a Prodigy setting (this recipe has optimizer {train.optimizer!r}); set "
                'train.optimizer = "prodigy" or remove it'
            )
    if train.lr_scheduler_num_cycles != 1 and train.lr_scheduler != "cosine_with_restarts":
        problems.append(
            f"train.lr_scheduler_num_cycles: only shapes lr_scheduler = 'cosine_with_restarts' (this recipe has "
            f"{train.lr_scheduler!r}); set that schedule or remove the key"
        )
    problems += _timestep_bias_problems(train)
    problems += _schedule_free_problems(train)
    if train.lr_scheduler_timescale is not None and train.lr_scheduler != "inverse_sqrt":
        problems.append(
            f"train.lr_scheduler_timescale: only shapes lr_scheduler = 'inverse_sqrt' (this recipe has "
            f"{train.lr_scheduler!r}); set that schedule or remove the key"
        )
    if train.lr_scheduler_power != 1 and train.lr_scheduler != "polynomial":
        problems.append(
            f"train.lr_scheduler_power: only shapes lr_scheduler = 'polynomial' (this recipe has "
            f"{train.lr_scheduler!r}); set that schedule or remove the key"
        )
    if train.lr_scheduler_min_lr_ratio and train.lr_scheduler not in ("cosine_with_min_lr", "warmup_stable_decay"):
        problems.append(
            "train.lr_scheduler_min_lr_ratio: only shapes lr_scheduler = 'cosine_with_min_lr' or "
            f"'warmup_stable_decay' (this recipe has {train.lr_scheduler!r}); set one of them or remove the key"
        )
    if train.lr_decay_steps and train.lr_scheduler != "warmup_stable_decay":
        problems.append(
            "train.lr_decay_steps: only shapes lr_scheduler = 'warmup_stable_decay' (this recipe has "
            f"{train.lr_scheduler!r}); set that schedule or remove the key"
        )
    if train.lr_scheduler == "warmup_stable_decay" and not train.lr_decay_steps:
        problems.append(
            "train.lr_decay_steps: lr_scheduler = 'warmup_stable_decay' needs the number of final steps that lower "
            "the rate, e.g. lr_decay_steps = 200 (a fifth of 1000 steps)"
        )
    return problems


def _timestep_bias_problems(train) -> list[str]:
    """Timestep-bias settings the chosen strategy ignores, and a bias that changes nothing."""
    used = {
        "none": (),
        "earlier": ("timestep_bias_multiplier", "timestep_bias_portion"),
        "later": ("timestep_bias_multiplier", "timestep_bias_portion"),
        "range": ("timestep_bias_multiplier", "timestep_bias_begin", "timestep_bias_end"),
    }[train.timestep_bias]
    problems = [
        f"train.{key}: not used by train.timestep_bias = {train.timestep_bias!r}; remove it"
        + (' or set timestep_bias = "earlier", "later" or "range"' if train.timestep_bias == "none" else "")
        for key in ("timestep_bias_multiplier", "timestep_bias_portion", "timestep_bias_begin", "timestep_bias_end")
        if key not in used and _not_default(train, key)
    ]
    if train.timestep_bias != "none" and train.timestep_bias_multiplier == 1:
        problems.append(
            "train.timestep_bias_multiplier: 1 draws the biased timesteps as often as the others, which changes "
            "nothing; give e.g. 2 (twice as often) or 0.5 (half as often)"
        )
    if train.timestep_bias == "range" and train.timestep_bias_end <= train.timestep_bias_begin:
        problems.append(
            f"train.timestep_bias_end: {train.timestep_bias_end} must be above train.timestep_bias_begin "
            f"({train.timestep_bias_begin})"
        )
    return problems


def _run_name_problems(name: str) -> list[str]:
    """A run name is one folder name inside output.folder: never empty, `.`/`..`, or a path."""
    if not name.strip():
        return ['output.name: empty; name the run, e.g. output.name = "character"']
    if name.strip() in (".", ".."):
        return [f'output.name: {name!r} names no run folder of its own; use a name such as "character"']
    if any(c in name for c in ("/", "\\", "\0")):
        return [
            f"output.name: {name!r} is a path; the run folder is output.folder/output.name, so give a plain name "
            "(set output.folder for the location)"
        ]
    return []


WANDB_PROJECT_REFUSED = "/\\#?%:"  # characters Weights & Biases refuses in a project name


def _tracker_problems(output) -> list[str]:
    """A tracker listed twice, and a wandb project name that Weights & Biases would refuse."""
    problems = [
        f"output.log_with: {tracker!r} is listed twice; give it once"
        for tracker in dict.fromkeys(output.log_with)
        if output.log_with.count(tracker) > 1
    ]
    if "wandb" in output.log_with:
        project = output.wandb_project
        bad = sorted({c for c in project if c in WANDB_PROJECT_REFUSED})
        if not project.strip() or bad or len(project) > 128:
            why = (
                f"holds {' '.join(bad)}" if bad else ("is empty" if not project.strip() else "is over 128 characters")
            )
            problems.append(
                f"output.wandb_project: {project!r} {why}; a Weights & Biases project name has at most 128 characters "
                f"and none of {' '.join(WANDB_PROJECT_REFUSED)}"
            )
    return problems


def _adapter_type_problems(lora, train) -> list[str]:
    """The keys that do not go with `lora.type`."""
    problems = []
    if lora.type == "lora":
        changed = [k for k in ("decompose_factor", "decompose_both", "use_effective_conv2d") if _not_default(lora, k)]
        problems += [f'lora.{k}: a LoKr/LoHa option; set lora.type = "lokr" or "loha", or remove it' for k in changed]
    else:
        name = {"lokr": "LoKr", "loha": "LoHa"}[lora.type]
        if lora.type == "loha":
            changed = [k for k in ("decompose_factor", "decompose_both") if _not_default(lora, k)]
            problems += [f"lora.{k}: a LoKr option; LoHa has no Kronecker factors" for k in changed]
        if lora.decompose_factor in (0, 1):
            problems.append(f"lora.decompose_factor: {lora.decompose_factor} splits nothing; use -1 or 2 and up")
        if lora.dropout:
            problems.append(f"lora.dropout: {name} has no input dropout in peft; set lora.dropout = 0")
        for key in ("neuron_dropout", "rank_dropout", "module_dropout"):
            if getattr(lora, key):
                problems.append(f"lora.{key}: drops parts of a LoRA's down and up projections; {name} has none")
        for key in ("block_ranks", "block_alphas", "conv_block_ranks", "conv_block_alphas"):
            if getattr(lora, key) is not None:
                problems.append(f"lora.{key}: per-block ranks are for LoRA; {name} adapters keep lora.rank")
        if lora.use_dora:
            problems.append(f"lora.use_dora: DoRA is a LoRA option; {name} cannot use it")
        if lora.tlora_min_rank is not None:
            problems.append(f"lora.tlora_min_rank: T-LoRA masks the ranks of a LoRA; {name} has none to mask")
        if lora.init_from:
            problems.append(f"lora.init_from: starts from a LoRA file; {name} runs start from zero")
        if train is not None and train.scale_weight_norms is not None:
            problems.append(
                f"train.scale_weight_norms: caps a LoRA module's update through its two factors; {name} modules have "
                "no such pair, so remove it"
            )
        for key in LORAPLUS_RATIOS:
            if train is not None and getattr(train, key) is not None:
                problems.append(
                    f"train.{key}: LoRA+ speeds up LoRA's up-projection (lora_up), which {name} does not "
                    "have; kohya sd-scripts and LyCORIS leave LoKr/LoHa weights at the base rate too"
                )
    for key in ("neuron_dropout", "rank_dropout", "module_dropout"):
        if lora.type == "lora" and lora.use_dora and getattr(lora, key):
            problems.append(
                f"lora.{key}: not with DoRA, whose magnitude is computed from every rank and module; set "
                f"lora.use_dora = false or lora.{key} = 0"
            )
    if lora.type == "lora" and lora.use_dora and train is not None and train.scale_weight_norms is not None:
        problems.append(
            "train.scale_weight_norms: DoRA sets each row's size with its own magnitude, which a cap on the low-rank "
            "update does not bound; set lora.use_dora = false or remove train.scale_weight_norms"
        )
    for prefix in ("", "conv_"):
        ranks, alphas = getattr(lora, f"{prefix}block_ranks"), getattr(lora, f"{prefix}block_alphas")
        if alphas is not None and ranks is None:
            problems.append(
                f"lora.{prefix}block_alphas: gives the alphas of lora.{prefix}block_ranks; set those too, or remove it"
            )
        if ranks is not None and alphas is not None and len(alphas) != len(ranks):
            problems.append(
                f"lora.{prefix}block_alphas: {len(alphas)} values for {len(ranks)} block ranks; give one per block, "
                "in the same order"
            )
    if lora.conv_block_ranks is not None and lora.target_modules != "transformer+conv":
        problems.append(
            "lora.conv_block_ranks: ranks for the 3x3 convolutions, which only "
            'lora.target_modules = "transformer+conv" adapts; set that, or remove it'
        )
    if lora.block_ranks is not None and not any(lora.block_ranks):
        problems.append("lora.block_ranks: every block is at 0, so the U-Net would get no adapter; raise one")
    if lora.tlora_min_rank is not None and (lora.block_ranks is not None or lora.conv_block_ranks is not None):
        problems.append(
            "lora.tlora_min_rank: T-LoRA masks one rank for every module; remove lora.block_ranks / conv_block_ranks"
        )
    if lora.tlora_min_rank is not None:
        if lora.type == "lora" and lora.use_dora:
            problems.append(
                "lora.tlora_min_rank: T-LoRA with DoRA is not supported (DoRA's magnitude uses every rank); "
                "set lora.use_dora = false or remove lora.tlora_min_rank"
            )
        convs = lora.conv_rank and lora.target_modules == "transformer+conv"
        ranks = [lora.rank] + ([lora.conv_rank] if convs else [])
        if lora.tlora_min_rank > min(ranks):
            problems.append(
                f"lora.tlora_min_rank: {lora.tlora_min_rank} is more than the rank ({min(ranks)}); use 1 to "
                f"{min(ranks)} (1 masks the most)"
            )
    elif _not_default(lora, "tlora_exponent"):
        problems.append("lora.tlora_exponent: shapes the T-LoRA schedule; set lora.tlora_min_rank too, or remove it")
    if lora.use_effective_conv2d and lora.target_modules != "transformer+conv":
        problems.append(
            "lora.use_effective_conv2d: only changes 3x3 convolutions; use target_modules = 'transformer+conv'"
        )
    return problems


def _not_default(section, key: str) -> bool:
    spec = next(f for f in dataclasses.fields(section) if f.name == key)
    default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    return getattr(section, key) != default


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
    if path.stat().st_size > RECIPE_MAX_BYTES:
        raise RecipeError(
            f"{path}: {path.stat().st_size:,} bytes is not a recipe (they are a few KB; the limit is "
            f"{RECIPE_MAX_BYTES:,}); pass a .toml file such as recipes/character.toml"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not valid TOML: {err}") from None
    except ValueError as err:  # an integer past Python's 4,300-digit conversion limit
        raise RecipeError(f"{path}: not a usable recipe: {err}") from None
    except RecursionError:
        raise RecipeError(f"{path}: not a usable recipe: arrays or tables nested too deeply") from None
    for text in overrides:
        section, key, value = parse_override(text)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"{path}: {section}: must be a table to take --set {text!r}")
        table[key] = value
    return recipe_from_dict(data, source=str(path))
