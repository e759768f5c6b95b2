"""Single-file checkpoints (`.safetensors`, as A1111, ComfyUI and the model sites hand them out) as base models.

A single file holds weights only. What it is comes from its tensor names (SGM's `conditioner.embedders.1.` is
SDXL; a 9-channel `input_blocks.0.0` is an inpainting model), and the prediction type from the marker tensors
the webuis read (`v_pred`, `ztsnr`); the component configs come from `model.config` or, for SDXL, from the
configs lorakit ships; the tokenizers from `model.config` or the Hugging Face cache. Whatever had to be
assumed is said in the log.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .architectures import write_sdxl_config_folder
from .errors import ModelError, first_line
from .formats.read import tensors_dtypes
from .formats.single_file import V_PRED_KEY, VAE_PREFIX, ZTSNR_KEY

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
_INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")  # the first, or the other two

# (a key only these checkpoints carry, what they are): refused, lorakit trains SD 1.x/2.x and SDXL bases.
_OTHER_KINDS = (
    ("joint_blocks.", "an SD3"),
    ("double_blocks.", "a Flux"),
    ("edm_mean", "a Playground v2.5 (EDM)"),
    ("edm_vpred.sigma_max", "an EDM v-prediction"),
)


@dataclass(frozen=True)
class FileFacts:
    """What a single file says about itself."""

    family: str  # "sd" (1.x/2.x: the config says which) or "sdxl"
    v_prediction: bool
    zero_terminal_snr: bool


def read_facts(path: Path) -> FileFacts:
    """The family and prediction markers of a single file, from its tensor names; other architectures, SDXL
    refiners and inpainting models are refused in one line."""
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            input_channels = f.get_slice(_INPUT_CONV).get_shape()[1] if _INPUT_CONV in keys else None
    except (SafetensorError, OSError) as err:
        raise ModelError(f"model.base: {path} is not a readable .safetensors file ({first_line(err)})") from None

    def refuse(kind: str) -> ModelError:
        return ModelError(
            f"model.base: {path} is {kind} single-file checkpoint; lorakit trains on SD 1.x/2.x and SDXL base "
            "models (and their fine-tunes)"
        )

    for marker, kind in _OTHER_KINDS:
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):
            raise refuse(kind)
    sdxl = any(k.startswith("conditioner.embedders.1.") for k in keys)
    if input_channels == 9:
        raise refuse("an SDXL inpainting" if sdxl else "an inpainting (9 input channels)")
    if not sdxl and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise refuse("an SDXL refiner")
    return FileFacts("sdxl" if sdxl else "sd", V_PRED_KEY in keys, ZTSNR_KEY in keys)


def read_dtype(path: Path, weight_dtype: str) -> str | None:
    """The dtype to read a single file's pipeline in: `weight_dtype` when its weights are stored in that half
    precision and its VAE in 16 bits (raised to float32 after, exactly), so nothing is held in float32 on the way;
    otherwise None (float32, cast after)."""
    if weight_dtype == "float32":
        return None
    whole, vae = tensors_dtypes(path, "", VAE_PREFIX)
    return weight_dtype if whole == weight_dtype and vae in ("float16", "bfloat16") else None


def load_single_file(
    base: str,
    config: str | None,
    log: Callable[[str], None],
    weight_dtype: str = "float32",
    read_as: str | None = None,
) -> Any:
    """The diffusers pipeline of a single-file base: SD 1.x/2.x with `config` (a diffusers folder or hub id of the
    same architecture), SDXL with `config` or the shipped SDXL configs. For training, its U-Net and text encoders
    come in `weight_dtype` when the file stores them so, the VAE in float32. `read_as` (what a render runs in)
    reads every component in that dtype instead, the VAE included."""
    from .models import is_local, resolve_base

    path = Path(base).expanduser()
    if path.suffix.lower() == ".ckpt":
        raise ModelError(
            f"model.base: {base} is a pickle checkpoint (.ckpt), which can run code when loaded; "
            "convert it to .safetensors first"
        )
    if not path.is_file():
        raise ModelError(f"model.base: {base} does not exist")
    import torch

    facts = read_facts(path)
    config_source = resolve_base(config) if config else None
    dtype = read_as or read_dtype(path, weight_dtype)
    read = {"dtype": getattr(torch, dtype)} if dtype else {}
    if facts.family == "sdxl":
        pipe = _load_sdxl(path, config_source, log, read)
    else:
        if config_source is None:
            raise ModelError(
                f"model.config: {base} is a single-file SD 1.x/2.x checkpoint; set model.config (--config) to a "
                "diffusers folder or hub id of the same architecture, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5"
            )
        from diffusers import StableDiffusionPipeline

        pipe = _read(
            StableDiffusionPipeline,
            path,
            config_source,
            {
                "safety_checker": None,
                "requires_safety_checker": False,
                "local_files_only": is_local(config_source),
                **read,
            },
        )
    if read_as is None:
        pipe.vae.to(torch.float32)  # exact from the 16 bits stored; SD VAEs overflow in float16
    _set_prediction(pipe, facts, path, configured=config_source is not None, log=log)
    return pipe


def _read(pipeline_class: Any, path: Path, config: str, kwargs: dict) -> Any:
    try:
        return pipeline_class.from_single_file(str(path), config=config, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"model.base: cannot read {path} with the configs of {config}: {first_line(err)}") from None


def _load_sdxl(path: Path, config: str | None, log: Callable[[str], None], read: dict) -> Any:
    from diffusers import StableDiffusionXLPipeline

    from .models import is_local, model_index

    if config is not None:
        if "text_encoder_2" not in model_index(config, None):
            raise ModelError(
                f"model.config: {config} is not an SDXL model (no text_encoder_2), but {path.name} is an SDXL "
                f"checkpoint; give an SDXL diffusers folder or hub id such as {SDXL_HUB_ID}, or leave model.config out"
            )
        log(f"model.base: {path.name} is an SDXL checkpoint, read with the configs and tokenizers of {config}")
        return _read(StableDiffusionXLPipeline, path, config, {"local_files_only": is_local(config), **read})
    tokenizers = _cached_sdxl_tokenizers(path)
    with tempfile.TemporaryDirectory(prefix="lorakit-sdxl-configs-") as folder:
        write_sdxl_config_folder(Path(folder))
        log(
            f"model.base: {path.name} is an SDXL checkpoint, read with lorakit's SDXL configs and the tokenizers "
            f"of {SDXL_HUB_ID} from the Hugging Face cache"
        )
        kwargs = {"local_files_only": True, "tokenizer": tokenizers[0], "tokenizer_2": tokenizers[1], **read}
        return _read(StableDiffusionXLPipeline, path, folder, kwargs)


def _cached_sdxl_tokenizers(path: Path) -> list[Any]:
    """SDXL's two tokenizers from the Hugging Face cache. The files are looked up first: transformers builds an
    empty tokenizer, without a word of warning, when they are missing."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import CLIPTokenizer

    folders = []
    for name in ("tokenizer", "tokenizer_2"):
        found = {f: try_to_load_from_cache(SDXL_HUB_ID, f"{name}/{f}") for f in _TOKENIZER_FILES}
        found = {f: Path(where) for f, where in found.items() if isinstance(where, str)}
        if "tokenizer.json" not in found and not {"vocab.json", "merges.txt"} <= found.keys():
            raise ModelError(
                f"model.config: {path.name} is an SDXL single file, which holds no tokenizers, and those of "
                f"{SDXL_HUB_ID} are not in the Hugging Face cache; set model.config (--config) to an SDXL diffusers "
                f"folder or hub id (with tokenizer/ and tokenizer_2/), e.g. {SDXL_HUB_ID}"
            )
        folders.append(next(iter(found.values())).parent)
    return [CLIPTokenizer.from_pretrained(str(folder)) for folder in folders]


def _set_prediction(pipe: Any, facts: FileFacts, path: Path, *, configured: bool, log: Callable[[str], None]) -> None:
    """The scheduler's prediction type (and zero-terminal-SNR schedule) from the file's markers, said in the log;
    without markers the config's scheduler decides, or epsilon is assumed and said."""
    scheduler = pipe.scheduler
    if facts.v_prediction:
        extra = {}
        said = "a v_pred key: v-prediction"
        if facts.zero_terminal_snr:
            extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
            said += "; a ztsnr key: zero-terminal-SNR schedule"
        pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type="v_prediction", **extra)
        log(f"model.base: {path.name} has {said}")
    elif configured:
        said = scheduler.config.prediction_type
        log(f"model.base: {path.name} has no v_pred key; prediction type {said} from model.config's scheduler")
    else:
        log(
            f"model.base: {path.name} has no v_pred key; assuming epsilon prediction (set model.prediction_type = "
            '"v_prediction" for a v-prediction model)'
        )
