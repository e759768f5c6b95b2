"""`lorakit from-kohya`: a kohya sd-scripts training config (the TOML that `--config_file` reads, and that the
kohya_ss GUI writes beside each run) turned into a lorakit recipe.

Every setting of the config is accounted for: mapped to a recipe key (the recipe records which kohya setting it
came from), not needed (what lorakit does by itself: attention kernels, latent caching to disk, data-loader
workers), or not supported, with why. Nothing is dropped without being named, and the recipe written is
validated as `lorakit train` would load it.
"""

from __future__ import annotations

import json
import math
import shlex
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LorakitError, RecipeError
from .files import IMAGE_SUFFIXES, atomic_write_text
from .recipe import recipe_from_dict, toml_value
from .recipe.sections import LrScheduler
from .recipe.validate import BLOCK_CURVE

CONFIG_MAX_BYTES = 1 << 20  # a training config is a few KB


class Unsupported(ValueError):
    """A setting lorakit has no equivalent for (its message says why, or what to use)."""


@dataclass
class Imported:
    """The recipe built from a kohya config and the account of every setting."""

    recipe: dict[str, dict[str, Any]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # recipe key -> the kohya setting it came from
    mapped: list[str] = field(default_factory=list)
    not_needed: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)  # "name: why"
    changed: list[str] = field(default_factory=list)  # "name: what it became and why", for settings mapped inexactly
    notes: list[str] = field(default_factory=list)
    read: int = 0  # settings in the config with a value

    def set(self, key: str, value: Any, source: str) -> None:
        section, name = key.split(".")
        self.recipe.setdefault(section, {})[name] = value
        self.origin[key] = source


# Settings lorakit does by itself, or that only tune kohya's own machinery.
NOT_NEEDED = {
    "xformers": "lorakit picks PyTorch's SDPA attention by itself",
    "sdpa": "lorakit picks PyTorch's SDPA attention by itself",
    "mem_eff_attn": "lorakit picks PyTorch's SDPA attention by itself",
    "cache_latents_to_disk": "cached latents always live on disk, in the dataset's .cache/",
    "cache_text_encoder_outputs": "a frozen text encoder's outputs are cached by themselves when captions are fixed",
    "cache_text_encoder_outputs_to_disk": "a frozen text encoder's outputs are cached by themselves",
    "max_data_loader_n_workers": "batches come from the latent cache",
    "persistent_data_loader_workers": "batches come from the latent cache",
    "vae_batch_size": "the VAE encodes once, into the cache",
    "lowram": "weights wait in system memory until their phase needs them",
    "highvram": "weights wait in system memory until their phase needs them",
    "save_model_as": "adapters are always safetensors, in the kohya layout and the diffusers one",
    "save_state": "every checkpoint is a resumable state",
    "save_state_on_train_end": "every checkpoint is a resumable state",
    "enable_bucket": "aspect-ratio buckets are always on (`lorakit prepare`)",
    "min_bucket_reso": "`lorakit prepare` fits every photo to its nearest bucket",
    "max_bucket_reso": "`lorakit prepare` fits every photo to its nearest bucket",
    "bucket_no_upscale": "`lorakit prepare --max-upscale`",
    "train_data_dir": "`lorakit prepare` reads it (printed below)",
    "logging_dir": "metrics.jsonl and tensorboard/ are in the run folder",
    "log_prefix": "metrics.jsonl and tensorboard/ are in the run folder",
    "sdxl": "the architecture is read from the base model",
    "v2": "the architecture is read from the base model",
    "no_half_vae": "the SDXL VAE always encodes in float32",
    "network_module": "read with network_args",
    "learning_rate": "read with unet_lr / text_encoder_lr",
    "optimizer_args": "read with optimizer_type",
    "network_args": "read with network_module",
    "use_safetensors": "adapters are always safetensors",
    "tokenizer_cache_dir": "the tokenizers come with the base model",
    "dynamo_backend": "train.compile uses torch.compile's own backend",
    "ddp_timeout": "lorakit sets up multi-process training itself",
    "ddp_gradient_as_bucket_view": "lorakit sets up multi-process training itself",
    "ddp_static_graph": "lorakit sets up multi-process training itself",
    "log_tracker_config": "metrics.jsonl and tensorboard/ are in the run folder",
    "log_config": "the run folder keeps recipe.resolved.toml",
    "wandb_run_name": "the Weights & Biases run is named after output.name",
    "disable_mmap_load_safetensors": "lorakit reads safetensors files itself",
    "skip_cache_check": "`lorakit prepare` and the latent cache check themselves by content",
    "text_encoder_batch_size": "text-encoder outputs are cached caption by caption",
    "output_config": "`lorakit from-kohya` writes the recipe",
    "weighting_scheme": "an SD3 / FLUX timestep sampling, not used by SD 1.x, 2.x or SDXL",
    "logit_mean": "an SD3 / FLUX timestep sampling, not used by SD 1.x, 2.x or SDXL",
    "logit_std": "an SD3 / FLUX timestep sampling, not used by SD 1.x, 2.x or SDXL",
    "mode_scale": "an SD3 / FLUX timestep sampling, not used by SD 1.x, 2.x or SDXL",
}
# Settings lorakit cannot carry over, and why (a setting in none of these tables: "lorakit has no equivalent").
_RESUME = "continue a lorakit run with `lorakit train RECIPE --resume latest`"
_UPLOAD = "lorakit does not upload; push the run folder with `hf upload`"
UNSUPPORTED = {
    "full_fp16": "lorakit trains the adapter in float32, or in bfloat16 with full_bf16 (train.full_bf16); float16 "
    "weights would need the loss-scaling patch sd-scripts makes to accelerate",
    "blocks_to_swap": "lorakit does not swap blocks to the CPU; see `lorakit plan --fit` for what fits",
    "cpu_offload_checkpointing": "lorakit does not offload checkpointed activations; see `lorakit plan --fit`",
    "fused_backward_pass": "a full fine-tuning memory saver; LoRA's optimizer state is small",
    "no_metadata": "lorakit always writes the ss_* and modelspec metadata that UIs and model sites read",
    **dict.fromkeys(("resume", "initial_epoch", "initial_step", "skip_until_initial_step"), _RESUME),
    **dict.fromkeys(
        (
            "huggingface_repo_id",
            "huggingface_repo_type",
            "huggingface_path_in_repo",
            "huggingface_token",
            "huggingface_repo_visibility",
            "save_state_to_huggingface",
            "async_upload",
        ),
        _UPLOAD,
    ),
    "resume_from_huggingface": "lorakit does not download runs; resume from a local run folder",
    "wandb_api_key": "lorakit keeps no API keys in recipes; run `wandb login` or set WANDB_API_KEY",
    "lr_scheduler_type": "lorakit builds its own schedules (train.lr_scheduler)",
    "lr_scheduler_args": "lorakit builds its own schedules (train.lr_scheduler)",
    "max_validation_steps": "lorakit computes val_loss on every held-out image",
    "network_train_text_encoder_only": "lorakit always trains the U-Net's adapter",
}

OPTIMIZERS = {
    "adamw": "adamw",
    "adamw8bit": "adamw8bit",
    "pagedadamw8bit": "adamw8bit",
    "lion": "lion",
    "lion8bit": "lion8bit",
    "pagedlion8bit": "lion8bit",
    "prodigy": "prodigy",
    "adafactor": "adafactor",
    "adamwschedulefree": "adamw_schedulefree",
    "ademamix8bit": "ademamix8bit",
    "pagedademamix8bit": "ademamix8bit",
}
# sd-scripts' D-Adaptation optimizers (dadaptation package): Prodigy is their successor, by the same authors, with the
# same learning-rate convention (1.0 scales the step size it finds) and the same one-rate-for-all-groups rule.
D_ADAPTATION = {
    "dadaptation",
    "dadaptadampreprint",
    "dadaptadam",
    "dadaptadagrad",
    "dadaptadan",
    "dadaptadanip",
    "dadaptlion",
    "dadaptsgd",
}
ADAPTIVE_RATE = 0.1  # sd-scripts warns below it for D-Adaptation and Prodigy: rates from here on are theirs
SCHEDULERS = typing.get_args(LrScheduler)  # the recipe's own names, which are kohya's
SCHEDULE_SHAPES = (  # kohya's settings of the schedule, each a recipe key of the same name
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_scheduler_num_cycles",
    "lr_scheduler_power",
    "lr_scheduler_min_lr_ratio",
    "lr_decay_steps",
    "lr_scheduler_timescale",
)
SAMPLERS = {
    "euler": "euler",
    "k_euler": "euler",
    "euler_a": "euler_a",
    "k_euler_a": "euler_a",
    "ddim": "ddim",
    "dpmsolver++": "dpmpp_2m",
    "dpmpp_2m": "dpmpp_2m",
}
SAVE_DTYPES = {"float": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _block_factors(value: Any) -> list[float] | str:
    """kohya's down_lr_weight / up_lr_weight: a list of factors, or one of its named curves ("sine+0.5")."""
    if isinstance(value, str) and BLOCK_CURVE.fullmatch(value.strip()):
        return value.strip()
    try:
        return _number_list(value, float)
    except Unsupported:
        raise Unsupported(
            f"{value!r}: give a list of numbers or sine, cosine, linear, reverse_linear, zeros"
        ) from None


def _mid_weight(value: Any) -> float | list[float]:
    """kohya's mid_lr_weight: one factor, or SDXL's three (its middle block's parts)."""
    if isinstance(value, int | float):
        return float(value)
    values = _number_list(value, float)
    return values[0] if len(values) == 1 else values


def _number_list(value: Any, cast: Callable[[str], Any]) -> list:
    if isinstance(value, list):
        return [cast(str(v)) for v in value]
    if not isinstance(value, str) or not all(c in "0123456789.,-+ e" for c in value.lower()):
        raise Unsupported(f"{value!r}: give a list of numbers")
    return [cast(v) for v in value.split(",") if v.strip()]


def _arguments(value: Any, name: str) -> dict[str, str]:
    """kohya's `network_args` / `optimizer_args`: a list of "key=value" strings (or one space-separated string)."""
    items = value if isinstance(value, list) else str(value).split()
    found = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep:
            raise LorakitError(f"{name}: {item!r} is not key=value")
        found[key.strip()] = text.strip().strip("\"'")
    return found


def _bool(value: Any) -> bool:
    """A kohya flag: a TOML boolean, or its text ("True", "false", "1")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{value!r} is not true or false")
    return text in ("true", "1", "yes")


def _resolution(value: Any) -> int:
    """kohya's `resolution`: "768" or "1024,768" (width, height); lorakit trains buckets of about one area."""
    sides = [int(float(v)) for v in str(value).replace("x", ",").split(",") if v.strip()]
    if len(sides) == 1 or sides[0] == sides[1]:
        return sides[0]
    return round(math.sqrt(sides[0] * sides[1]) / 64) * 64


def convert(
    settings: dict[str, Any], config_dir: Path, dataset: tuple[Path, dict[str, Any]] | None = None
) -> Imported:
    """The recipe for a flat dict of sd-scripts settings (`config_dir`: where relative prompt files are read) and,
    when given, a dataset config (its path and parsed TOML), which takes the place of `train_data_dir` and
    `reg_data_dir`."""
    result = Imported()
    if "caption_extention" in settings:  # sd-scripts' first spelling, which it still reads over the new one
        settings = {**settings, "caption_extension": settings["caption_extention"]}
        del settings["caption_extention"]
    if "in_json" in settings:  # the training config's name for a subset's metadata_file
        settings = {**settings, "metadata_file": settings["in_json"]}
        del settings["in_json"]
    left = dict(settings)

    def take(name: str, key: str, transform: Callable[[Any], Any] = lambda v: v) -> None:
        if name not in left:
            return
        value = left.pop(name)
        try:
            result.set(key, transform(value), name)
            result.mapped.append(name)
        except Unsupported as why:
            result.unsupported.append(f"{name}: {why}")
        except (TypeError, ValueError, IndexError) as err:
            raise LorakitError(f"{name} = {value!r}: not a value lorakit can read ({err})") from None

    for name in list(left):  # unset values in a kohya config mean "the default"
        if left[name] is None or left[name] == "":
            left.pop(name)
    result.read = len(left)

    for name, (key, cast) in DIRECT.items():
        take(name, key, cast)

    if _bool(left.pop("v_parameterization", False)):
        result.set("model.prediction_type", "v_prediction", "v_parameterization")
        result.mapped.append("v_parameterization")

    _network(left, result)
    _base_weights(left, result)
    if "fp8_base_unet" in left:  # the U-Net in float8, the text encoders not (over fp8_base, as sd-scripts has it)
        if _bool(left.pop("fp8_base_unet")):
            result.set("model.weight_dtype", "float8", "fp8_base_unet")
            result.set("model.float8_text_encoders", False, "fp8_base_unet")
            result.mapped.append("fp8_base_unet")
        else:
            result.not_needed.append("fp8_base_unet")
    if "network_train_unet_only" in left:
        unet_only = _bool(left.pop("network_train_unet_only"))
        result.set("lora.train_text_encoder", not unet_only, "network_train_unet_only")
        result.mapped.append("network_train_unet_only")

    if "token_string" in left:  # a train_textual_inversion.py config: the embedding alone
        _textual_inversion(left, result)
    if "text_encoder_lr" in left:  # SDXL configs may give each text encoder its own: a list of two
        value = left.pop("text_encoder_lr")
        rates = [float(value)] if isinstance(value, int | float) else _number_list(value, float)
        if not 1 <= len(rates) <= 2:
            raise LorakitError(f"text_encoder_lr = {value!r}: one rate, or two for SDXL's two text encoders")
        result.set("train.text_encoder_lr", rates[0], "text_encoder_lr")
        if len(rates) > 1 and rates[1] != rates[0]:
            result.set("train.text_encoder_2_lr", rates[1], "text_encoder_lr (its second value)")
        result.mapped.append("text_encoder_lr")
    rate = left.pop("learning_rate", None)
    if rate is not None:  # kohya's learning_rate is the default of both
        for key in ("train.unet_lr", "train.text_encoder_lr"):
            if key not in result.origin:
                result.set(key, float(rate), "learning_rate")
        result.mapped.append("learning_rate")
    take("lr_warmup_steps", "train.lr_warmup_steps", lambda v: _warmup(v, settings))
    take("lr_decay_steps", "train.lr_decay_steps", lambda v: _warmup(v, settings))
    _optimizer(left, result)
    _kept_saves(left, result, settings)

    if "sample_prompts" in left:
        value = left.pop("sample_prompts")
        try:
            prompts, dropped = _prompts(value, config_dir)
            result.set("sample.prompts", prompts, "sample_prompts")
            result.mapped.append("sample_prompts")
            result.unsupported += [f"sample_prompts {key}: {why}" for key, why in dropped.items()]
        except Unsupported as why:
            result.unsupported.append(f"sample_prompts: {why}")

    prepare_options = {name: left.pop(name) for name in SUBSET_PREPARE if name in left}
    if dataset is not None:  # sd-scripts ignores the data folders of the training config then
        for name in ("train_data_dir", "reg_data_dir", "dataset_config"):
            if name in left:
                left.pop(name)
                (result.mapped if name == "dataset_config" else result.not_needed).append(name)
        try:
            _dataset_config(dataset, settings, left, result)
        except (TypeError, ValueError) as err:
            raise LorakitError(f"{dataset[0]}: a setting has a value of the wrong kind ({err})") from None
    if "reg_data_dir" in left:
        result.unsupported.append(
            f"reg_data_dir: class images need a class prompt kohya takes from its folder names; add a [prior] section "
            f"with class_dir = {str(left.pop('reg_data_dir'))!r} and class_prompt"
        )
    if "prior_loss_weight" in left and not settings.get("reg_data_dir"):  # kohya writes it without class images too
        left.pop("prior_loss_weight")
        result.not_needed.append("prior_loss_weight")
    if "prior_loss_weight" in left:
        result.unsupported.append(
            f"prior_loss_weight: set prior_loss_weight = {left.pop('prior_loss_weight')} in that [prior] section"
        )

    if settings.get("train_data_dir") and dataset is None:
        side = result.recipe.get("data", {}).get("resolution", 512)
        folder = {**settings, **prepare_options, "resolution": side, "image_dir": settings["train_data_dir"]}
        result.notes.append(_prepare_line(folder, "dataset") + " --kohya-folders")
    # sd-scripts validates at every epoch's end unless told otherwise, and by steps only when told
    validation = result.recipe.get("validation", {})
    if "split" in validation:
        if "every_epochs" not in validation:
            result.set("validation.every_epochs", 1, "sd-scripts' default (validate_every_n_epochs unset: each epoch)")
        if "every_steps" not in validation:
            result.set("validation.every_steps", 0, "sd-scripts' default (validate_every_n_steps unset: never)")
    printed = dataset is not None or bool(settings.get("train_data_dir"))  # the options go into prepare lines
    (result.mapped if printed else result.not_needed).extend(prepare_options)
    if "dim_from_weights" in left:  # after network_weights became lora.init_from
        _dim_from_weights(left, result)
    for name in ("color_aug", "random_crop"):  # sd-scripts caches no latents unless told to, and refuses to then
        if result.recipe.get("data", {}).get(name) and "train.cache_latents" not in result.origin:
            result.set("train.cache_latents", False, f"{name}: each step encodes its images")
    for name in list(left):
        if name in NOT_NEEDED:
            result.not_needed.append(name)
        else:
            result.unsupported.append(f"{name}: {UNSUPPORTED.get(name, 'lorakit has no equivalent')}")
    return result


# kohya's dataset config (`--dataset_config`): [general], then [[datasets]] each with [[datasets.subsets]]; a
# subset reads a setting from itself, else its dataset, else [general], else the training config.
SUBSET_PREPARE = {  # settings that become options of the subset's `lorakit prepare` line
    "caption_extension": "--caption-ext",
    "class_tokens": "--class-tokens",
    "caption_prefix": "--trigger",
    "bucket_reso_steps": "--bucket-step",
    "alpha_mask": "--alpha-mask",
    "metadata_file": "--kohya-metadata",
    "caption_suffix": "--caption-suffix",
    "resize_interpolation": "--resize-filter",
    "random_crop": "--keep-margin",
}
SUBSET_READ = {"image_dir", "num_repeats", "is_reg", "batch_size", "network_multiplier", *SUBSET_PREPARE}
DATASET_NOT_NEEDED = {
    "cache_info": "`lorakit prepare` keeps its own state of what it read",
    "caption_separator": "tags are separated by commas",
}
DATASET_UNSUPPORTED = {
    "face_crop_aug_range": "`lorakit prepare` crops each photo once, to its bucket",
    "conditioning_data_dir": "ControlNet datasets are not LoRA training data",
}


@dataclass
class _Subset:
    place: str  # "subset 1.2": the 2nd subset of the 1st dataset
    settings: dict[str, Any]  # its own, its dataset's and [general]'s, the nearest winning


def _subsets(data: dict[str, Any], where: str) -> tuple[list[_Subset], list[tuple[str, str, Any]]]:
    """Each subset with what it reads, and every setting the file writes as (place, name, value)."""

    def table(value: Any, place: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise LorakitError(f"{where}: {place} is not a table; see kohya's docs/config_README-en.md")
        return {k: v for k, v in value.items() if v is not None and v != ""}

    data = dict(data)
    general = table(data.pop("general", {}), "[general]")
    datasets = data.pop("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise LorakitError(
            f"{where}: no [[datasets]]; a kohya dataset config lists them with their [[datasets.subsets]]"
        )
    written = [("the file", name, value) for name, value in data.items()]  # top-level keys kohya does not read
    written += [("[general]", name, value) for name, value in general.items()]
    subsets = []
    for i, raw in enumerate(datasets, 1):
        dataset = table(raw, f"dataset {i}")
        children = dataset.pop("subsets", [])
        if not isinstance(children, list) or not children:
            raise LorakitError(f"{where}: dataset {i} has no [[datasets.subsets]]; each names an image_dir")
        written += [(f"dataset {i}", name, value) for name, value in dataset.items()]
        for j, child in enumerate(children, 1):
            own = table(child, f"subset {i}.{j}")
            written += [(f"subset {i}.{j}", name, value) for name, value in own.items()]
            subsets.append(_Subset(f"subset {i}.{j}", {**general, **dataset, **own}))
    return subsets, written


def _dataset_config(
    dataset: tuple[Path, dict[str, Any]], settings: dict[str, Any], left: dict[str, Any], result: Imported
) -> None:
    """Carry a kohya dataset config over: a `lorakit prepare` line per subset, `data.folder` / `num_repeats`
    lists, the settings every subset shares, and the first `is_reg` subset as `[prior]`."""
    where = str(dataset[0])
    subsets, written = _subsets(dataset[1], where)
    training = [s for s in subsets if not _bool(s.settings.get("is_reg", False))]
    regs = [s for s in subsets if s not in training]
    if not training:
        raise LorakitError(f"{where}: every subset is is_reg = true; lorakit needs at least one subset to train on")
    for subset in subsets:
        if "image_dir" not in subset.settings:
            raise LorakitError(
                f"{where}: {subset.place} has no image_dir; lorakit prepares the photos of a folder"
                + (
                    " (give the folder its metadata_file's images are in)"
                    if "metadata_file" in subset.settings
                    else ""
                )
            )
    training, resolutions = _copies_at_resolutions(training, settings.get("resolution", 512))
    if resolutions:  # kohya's multi-resolution training: the same subsets in [[datasets]] of several resolutions
        source = "resolution (dataset_config: the same subsets at each)"
        result.set("data.resolution", resolutions[0], source)
        result.set("data.extra_resolutions", resolutions[1:], source)

    fates: dict[tuple[str, str], str] = {}  # (place, name) -> why not carried over; absent: mapped or not needed

    # What every training subset must share, because lorakit sets it once for the whole dataset.
    shared = {name for s in training for name in s.settings if name in DIRECT or name == "batch_size"}
    shared -= {"resolution"} if resolutions else set()
    for name in sorted(shared):
        key, cast = DIRECT[name] if name in DIRECT else ("train.batch_size", int)
        fallback = settings.get("train_batch_size" if name == "batch_size" else name, "unset")
        values = {s.place: s.settings.get(name, fallback) for s in training}
        if len({repr(v) for v in values.values()}) > 1:
            why = "differs between subsets (" + ", ".join(f"{v} in {p}" for p, v in values.items())
            why += f"); lorakit sets {key} once for the whole dataset"
            fates.update({(place, n): why for place, n, _ in written if n == name})
            continue
        value = next(iter(values.values()))
        try:
            result.set(key, cast(value), f"{name} (dataset_config)")
        except Unsupported as why:
            fates.update({(p, n): str(why) for p, n, _ in written if n == name})
        except (TypeError, ValueError, IndexError) as err:
            raise LorakitError(f"{where}: {name} = {value!r}: not a value lorakit can read ({err})") from None

    folders = ["dataset"] if len(training) == 1 else [f"dataset-{k}" for k in range(1, len(training) + 1)]
    repeats = [int(s.settings.get("num_repeats", 1)) for s in training]
    result.set("data.folder", folders[0] if len(folders) == 1 else folders, "image_dir (dataset_config), prepared")
    if any(r != 1 for r in repeats):
        result.set("data.num_repeats", repeats[0] if len(repeats) == 1 else repeats, "num_repeats (dataset_config)")
    try:  # a [[datasets]] (or [general]) setting: the adapter's strength on that dataset's images
        strengths = [float(s.settings.get("network_multiplier", 1.0)) for s in training]
    except (TypeError, ValueError):
        raise LorakitError(f"{where}: network_multiplier: not a number") from None
    if any(s != 1 for s in strengths):
        source = "network_multiplier (dataset_config)"
        result.set("data.adapter_strength", strengths[0] if len(strengths) == 1 else strengths, source)
    fallback = {
        name: settings[name] for name in (*SUBSET_PREPARE, "resolution", "enable_wildcard") if name in settings
    }
    largest = {"resolution": resolutions[0]} if resolutions else {}  # prepared once, at the largest
    for subset, folder in zip(training, folders, strict=True):
        result.notes.append(_prepare_line({**fallback, **subset.settings, **largest}, folder))

    if regs:
        _prior(regs, left, result, fates)

    reg_places = {s.place for s in regs}
    for place, name, value in written:
        label = f"{name} in {place}"
        if (place, name) in fates:
            continue
        if name == "num_repeats" and place in reg_places:
            result.not_needed.append(f"{label} (class images are drawn beside the photos as needed)")
        elif name == "network_multiplier" and place in reg_places and value != 1:
            fates[(place, name)] = "lorakit trains class images at strength 1"
        elif name in SUBSET_READ or name in DIRECT:
            result.mapped.append(label)
        elif name == "caption_separator" and value != ",":
            fates[(place, name)] = f"{value!r}: lorakit separates tags by commas"
        elif name in NOT_NEEDED or name in DATASET_NOT_NEEDED:
            result.not_needed.append(label)
        else:
            fates[(place, name)] = DATASET_UNSUPPORTED.get(name, "lorakit has no equivalent")
    grouped: dict[tuple[str, str], list[str]] = {}
    for (place, name), why in fates.items():
        grouped.setdefault((name, why), []).append(place)
    result.unsupported += [f"{name} ({', '.join(places)}): {why}" for (name, why), places in grouped.items()]
    result.read += len(written)


def _copies_at_resolutions(training: list[_Subset], default: Any) -> tuple[list[_Subset], list[int]]:
    """kohya's multi-resolution training: [[datasets]] that repeat the same subsets at other resolutions. Then one
    copy of each subset and the resolutions, largest first (lorakit's data.resolution and extra_resolutions);
    otherwise the subsets as they are and no resolutions. `default`: the training config's resolution."""

    def kind(subset: _Subset) -> tuple:  # what a subset is, apart from the resolution and batch its dataset sets
        return tuple(sorted((k, repr(v)) for k, v in subset.settings.items() if k not in ("resolution", "batch_size")))

    groups: dict[tuple, list[_Subset]] = {}
    for subset in training:
        groups.setdefault(kind(subset), []).append(subset)
    sides = [sorted({_resolution(s.settings.get("resolution", default)) for s in group}) for group in groups.values()]
    repeated = len(groups) < len(training)
    each_once = all(len(own) == len(group) for own, group in zip(sides, groups.values(), strict=True))
    if not repeated or not each_once or any(own != sides[0] for own in sides):
        return training, []
    return [group[0] for group in groups.values()], sorted(sides[0], reverse=True)


def _prepare_line(settings: dict[str, Any], folder: str) -> str:
    """The `lorakit prepare` command for one subset (`settings`: what it reads, the training config's included)."""
    side = _resolution(settings.get("resolution", 512))
    words = ["lorakit", "prepare", str(settings["image_dir"]), "--out", folder, "--resolution", str(side)]
    for name, option in SUBSET_PREPARE.items():
        value = settings.get(name)
        if value is None:
            continue
        if name in ("alpha_mask", "random_crop"):
            words += [option] if _bool(value) else []
        elif name == "metadata_file":  # a path: kept as written
            words += [option, str(value)]
        else:
            words += [option, " ".join(str(value).split())]
    # kohya reads a caption file's first line, or with enable_wildcard one of its lines per step
    words += ["--caption-lines", "choices" if _bool(settings.get("enable_wildcard", False)) else "first"]
    return shlex.join(words)


def _prior(regs: list[_Subset], left: dict[str, Any], result: Imported, fates: dict[tuple[str, str], str]) -> None:
    """The first `is_reg` subset becomes `[prior]`: class images in their own folder, drawn beside the photos."""
    first, *others = regs
    for other in others:
        fates[(other.place, "is_reg")] = f"lorakit takes one folder of class images (that of {first.place})"
    if "class_tokens" not in first.settings:
        fates[(first.place, "is_reg")] = "no class_tokens to caption the class images; add a [prior] section by hand"
        if "prior_loss_weight" in left:
            result.unsupported.append(
                f"prior_loss_weight: set {left.pop('prior_loss_weight')} in that [prior] section"
            )
        return
    folder = Path(str(first.settings["image_dir"])).expanduser()
    result.set("prior.class_dir", str(first.settings["image_dir"]), f"image_dir of {first.place}")
    result.set(
        "prior.class_prompt", " ".join(str(first.settings["class_tokens"]).split()), f"class_tokens of {first.place}"
    )
    count = sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0
    if count:
        result.set("prior.num_class_images", count, f"the images in {first.place}'s image_dir")
    else:
        fates[(first.place, "image_dir")] = (
            f"{folder} holds no images here, so prior.num_class_images is lorakit's 100 (train renders the missing "
            "class images with the base); set it to the folder's image count"
        )
    if "prior_loss_weight" in left:
        weight = left.pop("prior_loss_weight")
        result.set("prior.prior_loss_weight", float(weight), "prior_loss_weight")
        result.mapped.append("prior_loss_weight")


def _network(left: dict[str, Any], result: Imported) -> None:
    """`network_module` and `network_args`: the adapter type and its shape."""
    given = [name for name in ("network_module", "network_args") if name in left]
    module = str(left.pop("network_module", "networks.lora"))
    args = _arguments(left.pop("network_args", []), "network_args")
    if module not in ("networks.lora", "lycoris.kohya"):
        result.unsupported += [
            f"network_module: {module!r} (lorakit trains networks.lora and LyCORIS LoCon/LoKr/LoHa)",
            *([f"network_args: the arguments of {module}"] if "network_args" in given else []),
        ]
        return
    algo = args.pop("algo", "lora" if module == "networks.lora" else "locon").lower()
    kinds = {"lora": "lora", "locon": "lora", "lokr": "lokr", "loha": "loha"}
    if algo not in kinds:
        result.unsupported.append(f"network_args algo={algo}: lorakit trains lora, locon, lokr and loha")
        return
    result.mapped += given
    if kinds[algo] != "lora":
        result.set("lora.type", kinds[algo], "network_args algo")
    if "conv_dim" in args:
        result.set("lora.target_modules", "transformer+conv", "network_args conv_dim")
        result.set(
            "lora.conv_rank", _read(int, args.pop("conv_dim"), "network_args conv_dim"), "network_args conv_dim"
        )
        if "conv_alpha" in args:
            alpha = _read(float, args.pop("conv_alpha"), "network_args conv_alpha")
            result.set("lora.conv_alpha", alpha, "network_args conv_alpha")
    _conv_block_dims(args, result)
    for name, text in args.items():
        if name in NETWORK_ARGS:
            key, cast = NETWORK_ARGS[name]
            try:
                result.set(key, _read(cast, text, f"network_args {name}"), f"network_args {name}")
            except Unsupported as why:
                result.unsupported.append(f"network_args {name}: {why}")
        else:
            result.unsupported.append(f"network_args {name}={text}: lorakit has no equivalent")


BLOCK_WISE_ARGS = ("block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight")


def _conv_block_dims(args: dict[str, str], result: Imported) -> None:
    """`conv_block_dims` / `conv_block_alphas`: the 3x3 convolutions' rank and alpha per block (LoCon for those
    blocks even without conv_dim). sd-scripts reads them only beside block_dims or block-wise rates."""
    if "conv_block_dims" not in args:
        return
    dims, alphas = args.pop("conv_block_dims"), args.pop("conv_block_alphas", None)
    if not any(name in args for name in BLOCK_WISE_ARGS):
        result.unsupported.append(
            "network_args conv_block_dims: sd-scripts reads it only beside block_dims or block-wise rates, so it "
            "trained without it; not carried over"
        )
        return
    result.set("lora.target_modules", "transformer+conv", "network_args conv_block_dims")
    ranks = _read(lambda v: _number_list(v, int), dims, "network_args conv_block_dims")
    result.set("lora.conv_block_ranks", ranks, "network_args conv_block_dims")
    if alphas is not None:
        values = _read(lambda v: _number_list(v, float), alphas, "network_args conv_block_alphas")
        result.set("lora.conv_block_alphas", values, "network_args conv_block_alphas")


def _dim_from_weights(left: dict[str, Any], result: Imported) -> None:
    """`dim_from_weights`: the rank and alpha of the `network_weights` file, read now (tensors only), for
    lora.rank / lora.lora_alpha. kohya takes each module's own; lorakit trains one rank, the file's most common."""
    from collections import Counter

    from .errors import AdapterError, first_line
    from .formats.read import read_adapter_file

    if not _bool(left.pop("dim_from_weights")):
        result.not_needed.append("dim_from_weights")
        return
    path = result.recipe.get("lora", {}).get("init_from")
    if not path:
        result.unsupported.append("dim_from_weights: there is no network_weights file to take the rank from")
        return
    try:
        state = read_adapter_file(path).state
    except AdapterError as err:
        result.unsupported.append(f"dim_from_weights: {first_line(err)}; set lora.rank to the file's rank")
        return
    linear = [m for modules in state.values() for m in modules.values() if m.down.dim() == 2]
    ranks = Counter(m.down.shape[0] for m in linear)
    if not ranks:
        result.unsupported.append(f"dim_from_weights: {path} has no linear LoRA modules to take a rank from")
        return
    rank = ranks.most_common(1)[0][0]
    alpha = Counter(m.alpha for m in linear if m.down.shape[0] == rank).most_common(1)[0][0]
    result.set("lora.rank", rank, "dim_from_weights (the rank of network_weights' file)")
    result.set("lora.lora_alpha", float(alpha), "dim_from_weights (that file's alpha)")
    result.mapped.append("dim_from_weights")
    if len(ranks) > 1:
        others = ", ".join(f"{count} at rank {r}" for r, count in ranks.items() if r != rank)
        result.unsupported.append(
            f"dim_from_weights: {others} in {path}; lorakit trains one rank, {rank}, the file's most common"
        )


def _base_weights(left: dict[str, Any], result: Imported) -> None:
    """`base_weights` (LoRA files merged into the base before training) and their `base_weights_multiplier`."""
    files = left.pop("base_weights", [])
    files = files if isinstance(files, list) else [files]
    given = left.pop("base_weights_multiplier", None)
    if not files:
        if given is not None:
            result.not_needed.append("base_weights_multiplier")
        return
    scales = (
        [1.0] * len(files)
        if given is None
        else _number_list(given if isinstance(given, list | str) else [given], float)
    )
    if len(scales) != len(files):
        raise LorakitError(f"base_weights_multiplier = {given!r}: one per base_weights file ({len(files)})")
    entries = [str(f) if s == 1 else f"{f}:{s:g}" for f, s in zip(files, scales, strict=True)]
    source = "base_weights" + (", base_weights_multiplier" if given is not None else "")
    result.set("model.merged_adapters", entries, source)
    result.mapped += source.split(", ")


def _read(cast: Callable[[str], Any], text: str, where: str) -> Any:
    """One value of `network_args` / `optimizer_args` read with `cast`, or a one-line error naming it."""
    try:
        return cast(text)
    except (TypeError, ValueError) as err:
        raise LorakitError(f"{where} = {text!r}: not a value lorakit can read ({err})") from None


def _textual_inversion(left: dict[str, Any], result: Imported) -> None:
    """sd-scripts' `train_textual_inversion.py` settings: `[embedding] only = true` with the word, its vectors
    (sd-scripts' default is one), the words that start them and `learning_rate` as the vectors' rate; the word is
    also `data.trigger`, as sd-scripts' templates put it in every caption."""
    token = str(left.pop("token_string"))
    result.set("embedding.token", token, "token_string")
    result.set("embedding.only", True, "token_string (train_textual_inversion.py trains the embedding alone)")
    result.set("data.trigger", token, "token_string (every caption must hold it)")
    given = "num_vectors_per_token" in left
    vectors = int(left.pop("num_vectors_per_token", 1))
    result.set("embedding.vectors", vectors, "num_vectors_per_token" if given else "sd-scripts' default, one vector")
    result.mapped += ["token_string", *(["num_vectors_per_token"] if given else [])]
    for name, key, cast in (("init_word", "embedding.init_words", str), ("learning_rate", "embedding.lr", float)):
        if name in left:
            result.set(key, cast(left.pop(name)), name)
            result.mapped.append(name)
    for name in ("use_object_template", "use_style_template"):
        if name not in left:
            continue
        if _bool(left.pop(name)):
            result.unsupported.append(
                f"{name}: lorakit trains on your captions, with the word in front of each (data.trigger)"
            )
        else:
            result.not_needed.append(name)
    if "weights" in left:
        result.unsupported.append(f"weights: lorakit starts new vectors (from init_words), not {left.pop('weights')}")


def _optimizer(left: dict[str, Any], result: Imported) -> None:
    """`optimizer_type` and `optimizer_args`, and sd-scripts' older switches for two optimizers."""
    default = "kohya's default optimizer_type, AdamW"
    source, given = default, "AdamW"
    for flag, kind in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if flag not in left:
            continue
        if not _bool(left.pop(flag)):
            result.not_needed.append(flag)
        elif "optimizer_type" in left or source != default:
            other = "optimizer_type" if "optimizer_type" in left else source
            result.unsupported.append(f"{flag}: sd-scripts refuses it beside {other}; {other} kept")
        else:
            source, given = flag, kind
    if "optimizer_type" in left:
        source, given = "optimizer_type", str(left.pop("optimizer_type"))
    has_args = "optimizer_args" in left
    args = _arguments(left.pop("optimizer_args", []), "optimizer_args")
    # sd-scripts also takes a class by its full path, e.g. bitsandbytes.optim.AdEMAMix8bit
    known = given.lower().replace("_", "").removeprefix("bitsandbytes.optim.").removeprefix("dadaptation.")
    name = OPTIMIZERS.get(known)
    if name is None and known in D_ADAPTATION:
        name = "prodigy"
        result.changed.append(
            f"{source}: {given!r} became prodigy, D-Adaptation's successor by the same authors: the same learning "
            "rate of 1.0 (it scales the step size the optimizer finds), with Adam's moments"
        )
    if name is None:
        result.unsupported.append(
            f"optimizer_type: {given!r} (lorakit has {', '.join(sorted(set(OPTIMIZERS.values())))}); adamw8bit kept"
        )
        if has_args:
            result.unsupported.append("optimizer_args: settings of that optimizer")
        _adaptive_rates(result, given)
        return
    result.set("train.optimizer", name, source)
    result.mapped += ([source] if source != default else []) + (["optimizer_args"] if has_args else [])
    if name == "adamw_schedulefree":  # sd-scripts gives it a schedule that does nothing, and no warm-up
        for kohya in SCHEDULE_SHAPES:
            key = f"train.{kohya}"
            if result.origin.get(key) == kohya:
                del result.recipe["train"][key.split(".")[1]], result.origin[key]
                result.mapped.remove(kohya)
                result.unsupported.append(
                    f"{kohya}: sd-scripts does not use it with {given} (no schedule; its warm-up is optimizer_args "
                    "warmup_steps)"
                )
    adafactor_fixed = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    for key, text in args.items():
        where = f"optimizer_args {key}"
        if key == "weight_decay":
            result.set("train.weight_decay", _read(float, text, where), where)
        elif key == "betas":
            result.set("train.betas", _read(lambda v: _number_list(v, float), text, where), where)
        elif name == "prodigy" and key in ("d_coef", "use_bias_correction", "safeguard_warmup"):
            result.set(f"train.prodigy_{key}", _read(float if key == "d_coef" else _bool, text, where), where)
        elif name == "adafactor" and key in adafactor_fixed and _read(_bool, text, where) == adafactor_fixed[key]:
            continue  # what lorakit's Adafactor uses anyway
        elif name == "prodigy" and key == "decouple" and _read(_bool, text, where):
            continue  # Prodigy's default
        elif name == "adamw_schedulefree" and key == "warmup_steps":
            result.set("train.lr_warmup_steps", _read(int, text, where), where)
        else:
            result.unsupported.append(f"optimizer_args {key}={text}: not a setting lorakit passes to {name}")


def _adaptive_rates(result: Imported, given: str) -> None:
    """An optimizer not carried over that was given rates of 0.1 and more (an adaptive one's, such as 1.0): lorakit's
    default rates for the adamw8bit kept, which would diverge at those within a few steps."""
    keys = ("train.unet_lr", "train.text_encoder_lr", "train.text_encoder_2_lr")
    high = [k for k in keys if k in result.origin and result.recipe["train"][k.split(".")[1]] >= ADAPTIVE_RATE]
    for key in high:
        source = result.origin.pop(key)
        value = result.recipe["train"].pop(key.split(".")[1])
        if source in result.mapped:
            result.mapped.remove(source)
        result.unsupported.append(
            f"{source} = {value:g}: a rate for an optimizer that sizes its own steps (D-Adaptation, Prodigy), at "
            f"which adamw8bit diverges; lorakit's default {key} kept"
        )


def _kept_saves(left: dict[str, Any], result: Imported, settings: dict[str, Any]) -> None:
    """`save_last_n_steps` / `save_last_n_epochs` (and their `_state` forms, which count the resumable states that
    lorakit's checkpoints are, so they win): how many checkpoints to keep; `save_n_epoch_ratio`: how often to save."""
    for name in ("save_last_n_epochs", "save_last_n_epochs_state"):
        if name in left:
            result.set("train.keep_checkpoints", max(1, int(left.pop(name))), name)
            result.mapped.append(name)
    for name in ("save_last_n_steps", "save_last_n_steps_state"):
        if name not in left:
            continue
        every = int(settings.get("save_every_n_steps") or 0)
        steps = int(left.pop(name))
        if every:
            result.set("train.keep_checkpoints", max(1, steps // every), name)
            result.mapped.append(name)
        else:
            result.unsupported.append(f"{name}: counts steps of save_every_n_steps, which is not set")
    if "save_n_epoch_ratio" in left:  # sd-scripts saves every floor(epochs / ratio) epochs, at least every one
        ratio, epochs = int(left.pop("save_n_epoch_ratio")), int(settings.get("max_train_epochs") or 0)
        if ratio > 0 and epochs:
            result.set("train.save_every_epochs", max(1, epochs // ratio), "save_n_epoch_ratio")
            result.mapped.append("save_n_epoch_ratio")
        elif ratio > 0:
            result.unsupported.append("save_n_epoch_ratio: counts epochs of max_train_epochs, which is not set")
        else:
            result.not_needed.append("save_n_epoch_ratio")


def _scheduler(value: Any) -> str:
    if value not in SCHEDULERS:
        raise Unsupported(f"{value!r} (lorakit has {', '.join(SCHEDULERS)})")
    return value


def _warmup(value: Any, settings: dict[str, Any]) -> int:
    """kohya's lr_warmup_steps (and lr_decay_steps): a step count, or below 1 a share of max_train_steps."""
    number = float(value)
    if number >= 1 or number == 0:
        return int(number)
    if not settings.get("max_train_steps"):
        raise Unsupported(f"{value!r} is a share of max_train_steps, which is not set; give a step count")
    return int(number * int(settings["max_train_steps"]))


def _precision(value: Any) -> str:
    if value not in ("no", "fp16", "bf16"):
        raise Unsupported(f"{value!r} (use no, fp16 or bf16)")
    return value


def _save_dtype(value: Any) -> str:
    if value not in SAVE_DTYPES:
        raise Unsupported(f"{value!r} (use float, fp16 or bf16)")
    return SAVE_DTYPES[value]


def _loss_type(value: Any) -> str:
    if value not in ("l2", "l1", "huber", "smooth_l1"):
        raise Unsupported(f"{value!r} (lorakit has l2, l1, huber and smooth_l1)")
    return value


TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}


def _trackers(value: Any) -> list[str]:
    """kohya's `log_with`: tensorboard, wandb or all."""
    trackers = TRACKERS.get(str(value).strip().lower())
    if trackers is None:
        raise Unsupported(f"{value!r} (lorakit logs to tensorboard and wandb: give one of them, or all)")
    return trackers


def _sampler(value: Any) -> str:
    name = SAMPLERS.get(str(value).lower())
    if name is None:
        raise Unsupported(f"{value!r} (lorakit samples with euler, euler_a, dpmpp_2m and ddim)")
    return name


# kohya's keys of a prompt in its .toml / .json prompt files, and the inline option each is written as
PROMPT_OPTIONS = {"negative_prompt": "n", "width": "w", "height": "h", "seed": "d", "sample_steps": "s", "scale": "l"}


def _prompts(value: Any, config_dir: Path) -> tuple[list[str], dict[str, str]]:
    """kohya's sample prompt file, as `[sample] prompts` lines with kohya's inline options, and the prompt settings
    that do not carry over (by key, why). A .txt file has a prompt per line (`#` comments and blank lines skipped); a
    .toml one a [prompt] table whose settings each [[prompt.subset]] overrides; a .json one a list of prompt
    tables (or lines)."""
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else config_dir / path
    kind = path.suffix.lower()
    if kind not in (".txt", ".toml", ".json"):
        raise Unsupported(
            f"{value!r}: kohya reads .txt, .toml and .json prompt files; put the prompts in sample.prompts"
        )
    if not path.is_file():
        raise Unsupported(f"{path} not found; put the prompts in sample.prompts")
    text = path.read_text(encoding="utf-8", errors="replace")
    if kind == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")], {}
    try:
        if kind == ".toml":
            table = tomllib.loads(text)["prompt"]
            entries = [{**table, **subset} for subset in table.get("subset", [])]
        else:
            entries = json.loads(text)
    except (ValueError, KeyError, TypeError) as err:
        raise Unsupported(f"{path}: not a kohya prompt file ({type(err).__name__}: {err})") from None
    if not isinstance(entries, list) or not all(isinstance(e, str | dict) for e in entries):
        raise Unsupported(f"{path}: kohya's prompt files list prompts (tables or lines)")
    lines, dropped = [], {}
    for entry in entries:
        if isinstance(entry, str):
            lines.append(entry.strip())
            continue
        line = str(entry.get("prompt", "")).strip()
        for key, setting in entry.items():
            if key in PROMPT_OPTIONS and str(setting).strip():
                line += f" --{PROMPT_OPTIONS[key]} {str(setting).strip()}"
            elif key == "sample_sampler":
                dropped[key] = "lorakit draws every sample with one sampler, sample.sampler"
            elif key not in ("prompt", "subset", "enum"):
                dropped[key] = "not a sample prompt setting lorakit has"
        lines.append(line)
    return [line for line in lines if line], dropped


# The settings that map to one recipe key each, and how their values are read.
DIRECT: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "pretrained_model_name_or_path": ("model.base", str),
    "vae": ("model.vae", str),
    "clip_skip": ("model.clip_skip", int),
    "zero_terminal_snr": ("model.zero_terminal_snr", _bool),
    "resolution": ("data.resolution", _resolution),
    "shuffle_caption": ("data.shuffle_tags", _bool),
    "keep_tokens": ("data.keep_tokens", int),
    "keep_tokens_separator": ("data.keep_tokens_separator", str),
    "secondary_separator": ("data.secondary_separator", str),
    "caption_dropout_rate": ("data.caption_dropout", float),
    "caption_dropout_every_n_epochs": ("data.caption_dropout_every_epochs", int),
    "caption_tag_dropout_rate": ("data.caption_dropout_tags", float),
    "flip_aug": ("data.flip", _bool),
    "color_aug": ("data.color_aug", _bool),
    "random_crop": ("data.random_crop", _bool),
    "token_warmup_step": ("data.caption_warmup_steps", float),
    "token_warmup_min": ("data.caption_warmup_min", int),
    "enable_wildcard": ("data.wildcards", _bool),
    "weighted_captions": ("data.weighted_captions", _bool),
    "max_token_length": ("data.max_token_length", int),
    "masked_loss": ("data.masked_loss", _bool),
    "network_dim": ("lora.rank", int),
    "network_alpha": ("lora.lora_alpha", float),
    "network_dropout": ("lora.neuron_dropout", float),
    "network_weights": ("lora.init_from", str),
    "max_train_steps": ("train.max_steps", int),
    "max_train_epochs": ("train.max_epochs", int),
    "train_batch_size": ("train.batch_size", int),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", int),
    "unet_lr": ("train.unet_lr", float),
    "lr_scheduler": ("train.lr_scheduler", _scheduler),
    "lr_scheduler_num_cycles": ("train.lr_scheduler_num_cycles", int),
    "lr_scheduler_power": ("train.lr_scheduler_power", float),
    "lr_scheduler_min_lr_ratio": ("train.lr_scheduler_min_lr_ratio", float),
    "lr_scheduler_timescale": ("train.lr_scheduler_timescale", int),
    "mixed_precision": ("train.mixed_precision", _precision),
    "gradient_checkpointing": ("train.gradient_checkpointing", _bool),
    "full_bf16": ("train.full_bf16", _bool),
    "fp8_base": ("model.weight_dtype", lambda v: "float8" if _bool(v) else "float32"),
    "torch_compile": ("train.compile", _bool),
    "seed": ("train.seed", int),
    "max_grad_norm": ("train.max_grad_norm", float),
    "min_snr_gamma": ("train.min_snr_gamma", float),
    "noise_offset": ("train.noise_offset", float),
    "noise_offset_random_strength": ("train.noise_offset_random_strength", _bool),
    "adaptive_noise_scale": ("train.adaptive_noise_scale", float),
    "multires_noise_iterations": ("train.multires_noise_iterations", int),
    "multires_noise_discount": ("train.multires_noise_discount", float),
    "ip_noise_gamma": ("train.ip_noise_gamma", float),
    "ip_noise_gamma_random_strength": ("train.ip_noise_gamma_random_strength", _bool),
    "v_pred_like_loss": ("train.v_pred_like_loss", float),
    "debiased_estimation_loss": ("train.debiased_estimation", _bool),
    "scale_v_pred_loss_like_noise_pred": ("train.scale_v_pred_loss_like_noise_pred", _bool),
    "scale_weight_norms": ("train.scale_weight_norms", float),
    "loss_type": ("train.loss_type", _loss_type),
    "huber_c": ("train.huber_c", float),
    "huber_schedule": ("train.huber_schedule", str),
    "huber_scale": ("train.huber_scale", float),
    "min_timestep": ("train.min_timestep", int),
    "max_timestep": ("train.max_timestep", int),
    "down_lr_weight": ("train.down_lr_weight", _block_factors),
    "mid_lr_weight": ("train.mid_lr_weight", _mid_weight),
    "up_lr_weight": ("train.up_lr_weight", _block_factors),
    "cache_latents": ("train.cache_latents", _bool),
    "save_every_n_steps": ("train.save_every_steps", int),
    "save_every_n_epochs": ("train.save_every_epochs", int),
    "output_dir": ("output.folder", str),
    "output_name": ("output.name", str),
    "save_precision": ("output.save_dtype", _save_dtype),
    "training_comment": ("output.comment", str),
    "metadata_title": ("output.title", str),
    "metadata_author": ("output.author", str),
    "metadata_description": ("output.description", str),
    "metadata_license": ("output.license", str),
    "metadata_tags": ("output.tags", lambda v: [t.strip() for t in str(v).split(",") if t.strip()]),
    "sample_every_n_steps": ("sample.every_steps", int),
    "sample_every_n_epochs": ("sample.every_epochs", int),
    "sample_sampler": ("sample.sampler", _sampler),
    "log_with": ("output.log_with", _trackers),
    "log_tracker_name": ("output.wandb_project", str),
    "sample_at_first": ("sample.at_first", _bool),
    "validation_split": ("validation.split", float),
    "validate_every_n_steps": ("validation.every_steps", int),
    "validate_every_n_epochs": ("validation.every_epochs", int),
    "validation_seed": ("validation.seed", int),
}
# The `network_args` that map to one recipe key each (conv_dim / conv_alpha and algo are read in `_network`).
NETWORK_ARGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "factor": ("lora.decompose_factor", int),
    "rank_dropout": ("lora.rank_dropout", float),
    "module_dropout": ("lora.module_dropout", float),
    "loraplus_lr_ratio": ("train.loraplus_lr_ratio", float),
    "loraplus_unet_lr_ratio": ("train.loraplus_unet_lr_ratio", float),
    "loraplus_text_encoder_lr_ratio": ("train.loraplus_text_encoder_lr_ratio", float),
    "dora_wd": ("lora.use_dora", _bool),
    "decompose_both": ("lora.decompose_both", _bool),
    "use_tucker": ("lora.use_effective_conv2d", _bool),
    "block_dims": ("lora.block_ranks", lambda v: _number_list(v, int)),
    "block_alphas": ("lora.block_alphas", lambda v: _number_list(v, float)),
    "block_lr_zero_threshold": ("train.block_lr_zero_threshold", float),
}
# The settings read with others or with the config's context (handled in `convert`).
SPECIAL = (
    "v_parameterization",
    "dim_from_weights",
    "in_json",
    "network_module",
    "network_args",
    "base_weights",
    "base_weights_multiplier",
    "network_train_unet_only",
    "fp8_base_unet",
    "text_encoder_lr",
    "learning_rate",
    "lr_warmup_steps",
    "lr_decay_steps",
    "optimizer_type",
    "optimizer_args",
    "use_8bit_adam",
    "use_lion_optimizer",
    "token_string",
    "num_vectors_per_token",
    "init_word",
    "use_object_template",
    "use_style_template",
    "save_last_n_steps",
    "save_last_n_epochs",
    "save_last_n_steps_state",
    "save_last_n_epochs_state",
    "save_n_epoch_ratio",
    "sample_prompts",
    "reg_data_dir",
    "prior_loss_weight",
    "dataset_config",
)


def _read_toml(path: Path, what: str, option: str) -> dict[str, Any]:
    """A kohya TOML file (`what`: "training config" / "dataset config"; `option`: sd-scripts' option for it)."""
    if not path.is_file():
        raise LorakitError(f"{path}: not found; pass the .toml kohya sd-scripts reads with {option}")
    if path.stat().st_size > CONFIG_MAX_BYTES:
        raise LorakitError(f"{path}: {path.stat().st_size:,} bytes is not a {what} (they are a few KB)")
    text = ""
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError, RecursionError) as err:
        if what == "training config" and (path.suffix.lower() == ".json" or text.lstrip().startswith("{")):
            raise LorakitError(
                f"{path}: a kohya_ss GUI settings file (JSON), which sd-scripts does not read; pass the "
                "config_lora-*.toml the GUI writes into its output folder when it starts training"
            ) from None
        raise LorakitError(f"{path}: not valid TOML ({err}); pass the .toml kohya sd-scripts reads") from None


def read_config(path: Path) -> dict[str, Any]:
    """A kohya config's settings, flat: sd-scripts reads top-level keys and those of each table alike."""
    data = _read_toml(path, "training config", "--config_file")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def recipe_text(result: Imported, source: Path) -> str:
    """The recipe as TOML, each key with the kohya setting it came from."""
    lines = [f"# Made by `lorakit from-kohya {source.name}`; each key names the kohya setting it came from."]
    for section, values in result.recipe.items():
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {toml_value(v)}  # {result.origin[f'{section}.{k}']}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def from_kohya(
    config: str | Path, out: str | Path, *, dataset_config: str | Path | None = None, overwrite: bool = False
) -> tuple[Imported, Path]:
    """Write the recipe for the kohya config `config` (and the dataset config it names, or `dataset_config`) to
    `out`; the recipe is checked as train would load it."""
    config, out = Path(config).expanduser(), Path(out).expanduser()
    if out.exists() and not overwrite:
        raise LorakitError(f"--out {out}: exists; pass --overwrite to replace it or choose another file")
    settings = read_config(config)
    if dataset_config is not None:
        settings["dataset_config"] = str(dataset_config)
    dataset = None
    if settings.get("dataset_config"):
        path = Path(str(settings["dataset_config"])).expanduser()
        if not path.is_absolute() and not path.exists():  # sd-scripts reads it from where it runs
            path = config.parent / path
        dataset = (path, _read_toml(path, "dataset config", "--dataset_config"))
    try:
        result = convert(settings, config.parent, dataset)
    except (TypeError, ValueError) as err:
        raise LorakitError(f"{config}: a setting has a value of the wrong kind ({err})") from None
    if "model" not in result.recipe:
        raise LorakitError(f"{config}: no pretrained_model_name_or_path; a recipe needs the base model")
    result.recipe.setdefault("data", {})
    if "data.folder" not in result.origin:
        result.set("data.folder", "dataset", "train_data_dir, after `lorakit prepare`")
    try:
        recipe_from_dict(result.recipe, source=str(config))
    except RecipeError as err:
        lines = []
        for line in str(err).splitlines():
            key = next((k for k in result.origin if f": {k}:" in line), None)
            lines.append(line + (f" (from {result.origin[key]})" if key else ""))
        raise RecipeError("\n".join(lines)) from None
    atomic_write_text(out, recipe_text(result, config))
    return result, out
