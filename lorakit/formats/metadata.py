"""What an exported adapter says about itself: kohya's `ss_*` keys, Stability's ModelSpec, sshs hashes, and the
training record lorakit adds. A1111/Forge, ComfyUI and model sites read these; `convert` re-computes the hashes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save

from .. import __version__, timestep_rank
from ..embedding import EMBEDDINGS_FOLDER
from ..recipe import Recipe, dump_recipe

if TYPE_CHECKING:
    from ..data import Item

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass
class AdapterInfo:
    """What the metadata of an exported adapter says about it and how it was trained."""

    family: str
    base_model: str
    prediction_type: str
    rank: int
    alpha: float
    targets: str
    output_name: str
    training: dict[str, str] = field(default_factory=dict)  # extra ss_* / lorakit_* keys, already strings
    resolution: int = 512
    trigger: str = ""
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset folder name -> tag -> count
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # folder name -> n_repeats, img_count


def kohya_metadata(info: AdapterInfo) -> dict[str, str]:
    """The safetensors header metadata: kohya's minimum `ss_*` keys plus lorakit's own."""

    base_version = BASE_MODEL_VERSION[info.family]
    if info.family == "sd2" and info.prediction_type == "v_prediction":
        base_version = "sd_v2_v"
    metadata = {
        "ss_v2": str(info.family == "sd2"),
        "ss_base_model_version": base_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": f"{info.alpha:g}",
        "ss_network_args": json.dumps({}),
        "ss_output_name": info.output_name,
        "ss_sd_model_name": info.base_model,
        "lorakit_version": __version__,
        "lorakit_base_model": info.base_model,
        "lorakit_rank": str(info.rank),
        "lorakit_alpha": f"{info.alpha:g}",
        "lorakit_targets": info.targets,
    }
    if info.tag_frequency:
        metadata["ss_tag_frequency"] = json.dumps(info.tag_frequency)
    if info.dataset_dirs:
        metadata["ss_dataset_dirs"] = json.dumps(info.dataset_dirs)
    metadata.update(modelspec(info))
    metadata.update(info.training)
    return metadata


MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
}


def modelspec(info: AdapterInfo) -> dict[str, str]:
    """The Stability AI ModelSpec keys (`modelspec.*`) that model sites and UIs read."""

    architecture = MODELSPEC_ARCHITECTURE[info.family]
    if info.family == "sd2" and info.prediction_type == "v_prediction":
        architecture = "stable-diffusion-v2-768-v"
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": info.output_name,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
        "modelspec.date": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if info.prediction_type == "v_prediction" else "epsilon",
    }
    if info.trigger:
        spec["modelspec.trigger_phrase"] = info.trigger
    return spec


def _descriptive(output) -> dict[str, str]:
    """The `output` section's words about the adapter: ModelSpec's title, author, description, license and tags,
    and kohya's training comment (only those set; the title otherwise stays the run name)."""
    found = {
        "modelspec.title": output.title,
        "modelspec.author": output.author,
        "modelspec.description": output.description,
        "modelspec.license": output.license,
        "modelspec.tags": ", ".join(output.tags),
        "ss_training_comment": output.comment,
    }
    return {key: value for key, value in found.items() if value}


def sshs_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as kohya computes them: on a serialisation holding the tensors
    and only the `ss_*` metadata, the sha256 of the bytes after the header, and of the 64 KiB at 1 MiB."""

    blob = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[header:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    }


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()


def training_info(
    recipe: Recipe,
    family: str,
    items: list[Item],
    steps: int,
    started: datetime,
    num_train_timesteps: int = 1000,
    epoch: int | None = None,
) -> AdapterInfo:
    """The metadata of a run's exported adapter: what it is, and kohya's `ss_*` record of how it was trained
    (`epoch`: the whole epochs taken by then)."""
    cfg, lora = recipe.train, recipe.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else json.dumps(lora.target_modules)
    network_args = {}
    if lora.type != "lora":  # what a LyCORIS file says about itself (its `network_args` spelling)
        network_args = {
            "algo": lora.type,
            "factor": str(lora.decompose_factor),
            "decompose_both": str(lora.decompose_both),
            "use_tucker": str(lora.use_effective_conv2d),
        }
    network_args |= {key: str(getattr(lora, key)) for key in ("rank_dropout", "module_dropout") if getattr(lora, key)}
    if lora.block_ranks is not None:  # kohya's spelling: comma-separated, one per block
        network_args["block_dims"] = ",".join(map(str, lora.block_ranks))
        alphas = lora.block_alphas or [lora.lora_alpha] * len(lora.block_ranks)
        network_args["block_alphas"] = ",".join(f"{a:g}" for a in alphas)
    if lora.conv_block_ranks is not None:
        network_args["conv_block_dims"] = ",".join(map(str, lora.conv_block_ranks))
        default = lora.conv_alpha if lora.conv_alpha is not None else lora.lora_alpha
        conv_alphas = lora.conv_block_alphas or [default] * len(lora.conv_block_ranks)
        network_args["conv_block_alphas"] = ",".join(f"{a:g}" for a in conv_alphas)
    if lora.target_modules == "transformer+conv":
        network_args |= {
            "conv_dim": str(lora.conv_rank or lora.rank),
            "conv_alpha": f"{lora.conv_alpha if lora.conv_alpha is not None else lora.lora_alpha:g}",
        }
    training = {
        "ss_network_module": "lycoris.kohya" if lora.type != "lora" else "networks.lora",
        "ss_network_args": json.dumps(network_args),
        "ss_network_dropout": str(lora.neuron_dropout or None),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(cfg.max_epochs),
        "ss_num_train_images": str(sum(item.repeats for item in items)),
        "ss_learning_rate": str(cfg.unet_lr),
        "ss_unet_lr": str(cfg.unet_lr),
        "ss_text_encoder_lr": str(_text_encoder_rates(cfg) if lora.train_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not lora.train_text_encoder),
        "ss_optimizer": cfg.optimizer,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_fp8_base": str(recipe.model.weight_dtype == "float8"),
        "ss_full_bf16": str(cfg.full_bf16),
        "ss_seed": str(cfg.seed),
        "ss_resolution": f"({recipe.data.resolution}, {recipe.data.resolution})",
        "ss_clip_skip": str(recipe.model.clip_skip),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_noise_offset_random_strength": str(cfg.noise_offset_random_strength),
        "ss_adaptive_noise_scale": str(cfg.adaptive_noise_scale or None),
        "ss_scale_v_pred_loss_like_noise_pred": str(cfg.scale_v_pred_loss_like_noise_pred),
        "ss_multires_noise_iterations": str(cfg.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(cfg.multires_noise_discount if cfg.multires_noise_iterations else None),
        "ss_ip_noise_gamma": str(cfg.ip_noise_gamma or None),
        "ss_ip_noise_gamma_random_strength": str(cfg.ip_noise_gamma_random_strength),
        "ss_debiased_estimation": str(cfg.debiased_estimation),
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_c": str(cfg.huber_c),
        "ss_huber_scale": str(cfg.huber_scale),
        "ss_scale_weight_norms": str(cfg.scale_weight_norms),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_max_token_length": str(recipe.data.max_token_length),
        "ss_training_started_at": str(started.timestamp()),
        "ss_training_finished_at": str(datetime.now(UTC).timestamp()),
        "lorakit_steps": str(steps),
        "lorakit_recipe_sha256": recipe_hash(recipe),
        "lorakit_trigger": recipe.data.trigger,
        "lorakit_ema_decay": str(cfg.ema_decay),
    }
    training |= _descriptive(recipe.output)
    if lora.tlora_min_rank is not None:  # so lorakit draws the adapter under the schedule it was trained with
        training[timestep_rank.METADATA_MIN_RANK] = str(lora.tlora_min_rank)
        training[timestep_rank.METADATA_EXPONENT] = str(lora.tlora_exponent)
        training[timestep_rank.METADATA_TIMESTEPS] = str(num_train_timesteps)
    if recipe.data.strengths_vary:  # an image slider: which folder trained at which strength
        folders = [recipe.data.folder] if isinstance(recipe.data.folder, str) else recipe.data.folder
        strengths = {Path(folder).name: s for folder, s in zip(folders, recipe.data.strengths, strict=True)}
        training["lorakit_adapter_strengths"] = json.dumps(strengths)
    if recipe.slider is not None:  # what the two ends of the slider are, for whoever loads it
        section = recipe.slider
        for key in ("positive", "negative", "target_class"):  # a list of several targets' prompts as JSON
            value = getattr(section, key)
            training[f"lorakit_slider_{key}"] = value if isinstance(value, str) else json.dumps(value)
        ends = [
            f"{target or 'pictures'!r} towards {positive!r}, negative ones towards {negative!r}"
            for target, positive, negative in section.targets
        ]
        training["lorakit_slider_note"] = f"a concept slider: positive strengths draw {'; '.join(ends)}; 0 is the base"
    if recipe.embedding is not None:  # the adapter was trained with the word's own vectors: say where they are
        token = recipe.embedding.token
        training["lorakit_embedding"] = f"{EMBEDDINGS_FOLDER}/{token}.safetensors"
        training["lorakit_embedding_note"] = (
            f"trained with a textual-inversion embedding for {token!r} ({recipe.embedding.vectors} vectors); load "
            "that file with this adapter"
        )
    return AdapterInfo(
        family=family,
        base_model=recipe.model.base,
        prediction_type=recipe.model.prediction_type,
        rank=lora.rank,
        alpha=lora.lora_alpha,
        targets=targets,
        output_name=recipe.output.name,
        training=training,
        resolution=recipe.data.resolution,
        trigger=recipe.data.trigger,
        tag_frequency=_tag_frequency(items),
        dataset_dirs=_dataset_dirs(items),
    )


def _text_encoder_rates(cfg) -> float | list[float]:
    """kohya's `ss_text_encoder_lr`: one rate, or SDXL's two when the second encoder has its own."""
    if cfg.text_encoder_2_lr is None:
        return cfg.text_encoder_lr
    return [cfg.text_encoder_lr, cfg.text_encoder_2_lr]


def _dataset_key(item: Item) -> str:
    """The folder kohya's metadata names an item by: its `N_words` folder when prepare took one, else its dataset's."""
    return item.group or Path(item.folder).name or item.folder


def _tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: per dataset folder, how many captions carry each comma-separated tag."""
    frequency: dict[str, dict[str, int]] = {}
    for item in items:
        counts = frequency.setdefault(_dataset_key(item), {})
        for tag in {t.strip() for t in item.caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return frequency


def _dataset_dirs(items: list[Item]) -> dict[str, dict[str, int]]:
    dirs: dict[str, dict[str, int]] = {}
    for item in items:
        entry = dirs.setdefault(_dataset_key(item), {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs


def a1111_short_hash(path: Path) -> str:
    """The 12 characters AUTOMATIC1111 writes as a LoRA's hash in `Lora hashes` (and looks up when an infotext is
    pasted): the start of the file's `sshs_model_hash`, else of the sha256 of the bytes after the safetensors
    header. Not the hash of the whole file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        try:
            recorded = json.loads(header).get("__metadata__", {}).get("sshs_model_hash")
        except (ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded:
            return recorded[:12]
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
