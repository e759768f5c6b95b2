"""Peak GPU memory of a training run, by phase and part, before any weight is loaded: what `lorakit plan` prints.

Exact parts are counted on the real architecture built on the meta device (the shipped configs, or the base's own
when it is a local diffusers folder): frozen weights per component and dtype, the LoRA parameters peft adds for the
recipe's rank, type and targets, their gradients, and the optimizer state tensor by tensor (bitsandbytes' 8-bit
AdamW keeps float32 state for tensors under 4,096 elements and one float32 absmax per 256-element block).

Activations and the VAE encode are not counted but modelled per latent pixel, calibrated on measured peaks (see
ACTIVATIONS and VAE_ENCODE); their sources and how far each is a guess are said next to each figure.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError

GIB = 2**30
CUDA_CONTEXT_GIB = 0.45  # CUDA context and libraries outside PyTorch's allocator (two published OOM reports)
ALLOCATOR_SLACK = 0.03  # reserved but unused at the peak: 1.6-2.7 % measured, more with varying bucket shapes
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps float32 state below this many elements
BNB_BLOCK = 256  # one float32 absmax per block per state (bitsandbytes 0.50.2)

# Activations of one training sample per latent pixel (fp16 autocast, SDPA / memory-efficient attention), GiB:
#   SDXL: 10 GiB per 1024 px sample without gradient checkpointing, 1.6 GiB with it (the published tier-A table,
#   kohya sd-scripts 0.8.3; ../shared/memory-readings.md). SD 1.x/2.x with checkpointing: 0.36 GiB per 512 px
#   sample (H200, 2026-11-29: a bare step's peak went from 2.34 to 3.42 GiB between batch 1 and 4). SD 1.x/2.x
#   without checkpointing: the SDXL ratio (6.25x) applied to that reading, a rough guess until measured.
ACTIVATIONS = {
    ("sdxl", True): 1.6 / (128 * 128),
    ("sdxl", False): 10.0 / (128 * 128),
    ("sd", True): 0.36 / (64 * 64),
    ("sd", False): 0.36 * 6.25 / (64 * 64),
}
# The VAE encoding one image while the latent cache fills, GiB per image pixel per byte of the VAE's dtype:
# 3.35 GiB for the SDXL VAE in float32 at 1024 px (H200, 2026-11-29: the run's peak less the resident weights).
VAE_ENCODE = 3.35 / (1024 * 1024 * 4)

GPUS = {  # nominal memory of common cards, GiB (NVIDIA's "GB" on these cards are GiB)
    "RTX 2060 6GB": 6,
    "RTX 2080 Ti 11GB": 11,
    "RTX 3060 12GB": 12,
    "RTX 3060 Ti 8GB": 8,
    "RTX 3070 8GB": 8,
    "RTX 3080 10GB": 10,
    "RTX 3080 12GB": 12,
    "RTX 3090 24GB": 24,
    "RTX 4060 8GB": 8,
    "RTX 4060 Ti 8GB": 8,
    "RTX 4060 Ti 16GB": 16,
    "RTX 4070 12GB": 12,
    "RTX 4070 Ti Super 16GB": 16,
    "RTX 4080 16GB": 16,
    "RTX 4090 24GB": 24,
    "RTX 5090 32GB": 32,
    "T4 16GB": 16,
    "A10 24GB": 24,
    "L4 24GB": 24,
    "A100 40GB": 40,
    "A100 80GB": 80,
    "H100 80GB": 80,
    "H200 141GB": 141,
}
HEADROOM = {"linux": 0.05, "windows": 0.10}  # Windows drivers spill into system RAM instead of failing


@dataclass(frozen=True)
class Part:
    phase: str  # "latent caching", "text caching", "training step", "optimizer step" or "sampling"
    name: str
    gib: float
    how: str  # "counted" (exact) or where a modelled figure comes from


@dataclass
class MemoryEstimate:
    architecture: str
    bucket: tuple[int, int]
    bucket_source: str
    batch_size: int
    parts: list[Part] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)  # element counts of the trainable tensors
    loaded: dict[str, float] = field(default_factory=dict)  # GiB of system memory per component once loaded
    configs: str = ""  # where the component configs that the parts are counted on come from

    @property
    def loaded_gib(self) -> float:
        """System memory the frozen weights take from load on: each waits there until its phase needs it."""
        return sum(self.loaded.values())

    def phase_gib(self, phase: str) -> float:
        return sum(p.gib for p in self.parts if p.phase == phase)

    @property
    def phases(self) -> list[str]:
        return list(dict.fromkeys(p.phase for p in self.parts))

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_gib)

    @property
    def allocated_gib(self) -> float:
        """PyTorch's allocator peak (`torch.cuda.max_memory_allocated`)."""
        return self.phase_gib(self.peak_phase)

    @property
    def process_gib(self) -> float:
        """What nvidia-smi or the Windows Task Manager show for the process at the peak."""
        return self.allocated_gib * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB

    def verdict(self, card_gib: float, system: str = "linux") -> tuple[bool, str]:
        """(fits, one line) against a card of `card_gib`, keeping the OS's headroom."""
        usable = card_gib * (1 - HEADROOM[system])
        share = self.process_gib / card_gib
        fits = self.process_gib <= usable
        word = "fits" if fits else "does not fit"
        spill = "; past it Windows spills into system RAM, 10-100x slower" if system == "windows" else ""
        return fits, (
            f"{word} a {card_gib:g} GiB card on {system}: {self.process_gib:.1f} GiB is {share:.0%} of it "
            f"({HEADROOM[system]:.0%} headroom kept{spill})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "bucket": list(self.bucket),
            "bucket_source": self.bucket_source,
            "configs": self.configs,
            "batch_size": self.batch_size,
            "parts": [dataclasses.asdict(p) for p in self.parts],
            "phases": {phase: round(self.phase_gib(phase), 3) for phase in self.phases},
            "peak_phase": self.peak_phase,
            "allocated_gib": round(self.allocated_gib, 3),
            "process_gib": round(self.process_gib, 3),
            "load": {name: round(gib, 3) for name, gib in self.loaded.items()},
            "load_gib": round(self.loaded_gib, 3),
        }


# Optimizers whose state tensors take their parameters' dtype (bfloat16 with train.full_bf16), and how many tensors
# of its parameter's size each keeps: AdamW's exp_avg and exp_avg_sq, schedule-free's z and exp_avg_sq, Prodigy's
# exp_avg, exp_avg_sq, s and p0. bitsandbytes' keep their 8-bit or float32 state and Adafactor its float32 factors
# whatever the parameters are.
STATE_IN_PARAMETER_DTYPE = {"adamw": 2, "adamw_schedulefree": 2, "prodigy": 4}

# train.stochastic_rounding lifts the trained tensors to float32 for the optimizer step this many values at a time,
# so the float32 copies take 100 MB (8-bit AdamW) to 235 MB (AdamW) whatever the adapter's size (an SDXL LoRA of rank
# 128 has 341 million values). Prodigy's step size and schedule-free AdamW's averaging weight come from every tensor
# of the step, so those two lift them all at once.
ROUNDING_CHUNK = 1 << 24
WHOLE_STEP_OPTIMIZERS = ("prodigy", "adamw_schedulefree")


def rounding_chunk(optimizer: str) -> int | None:
    """Values of trained tensors one stochastically rounded step lifts at a time; None: all of them."""
    return None if optimizer in WHOLE_STEP_OPTIMIZERS else ROUNDING_CHUNK


def chunked(sizes: list[int], chunk: int | None) -> list[list[int]]:
    """The positions of tensors of these sizes, in order, in runs of at most `chunk` values (a larger tensor alone);
    None: one run."""
    if chunk is None:
        return [list(range(len(sizes)))] if sizes else []
    runs: list[list[int]] = []
    size = chunk
    for position, count in enumerate(sizes):
        if size + count > chunk:
            runs.append([])
            size = 0
        runs[-1].append(position)
        size += count
    return runs


def optimizer_state_bytes(optimizer: str, numels: list[int], parameter_bytes: int = 4) -> int:
    """Bytes of optimizer state for trainable tensors of these sizes (float32 parameters; bfloat16 ones with
    `parameter_bytes` = 2)."""
    if optimizer in STATE_IN_PARAMETER_DTYPE:
        return sum(STATE_IN_PARAMETER_DTYPE[optimizer] * parameter_bytes * n for n in numels)
    if optimizer == "adamw8bit":
        return sum(8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) for n in numels)
    if optimizer == "adafactor":  # factored second moment: one row and one column vector per matrix, no momentum
        return sum(4 * n for n in numels)  # an upper bound: LoRA factors are thin, their rows+cols ~ their numel
    if optimizer == "lion":  # one float32 momentum buffer
        return sum(4 * n for n in numels)
    if optimizer == "lion8bit":  # one 8-bit momentum buffer with its block scales; float32 under the threshold
        return sum(4 * n if n < BNB_MIN_8BIT_SIZE else n + 4 * math.ceil(n / BNB_BLOCK) for n in numels)
    if optimizer == "ademamix8bit":  # fast and slow momentum and the second moment, each 8-bit with block scales
        return sum(12 * n if n < BNB_MIN_8BIT_SIZE else 3 * n + 3 * 4 * math.ceil(n / BNB_BLOCK) for n in numels)
    raise RecipeError(
        f"train.optimizer: {optimizer!r} has no memory model; use adamw8bit, adamw, adafactor, prodigy, lion8bit, "
        "lion, adamw_schedulefree or ademamix8bit"
    )


@dataclass(frozen=True)
class DiskEstimate:
    latents: int  # the latent cache (in the dataset's .cache/)
    checkpoints: int  # the newest kept checkpoints and the one being written
    adapters: int  # the exported adapter files

    def line(self) -> str:
        total = self.latents + self.checkpoints + self.adapters
        return (
            f"Disk: about {mib(total)} (latent cache {mib(self.latents)}, checkpoints {mib(self.checkpoints)}, "
            f"adapter files {mib(self.adapters)})"
        )


def mib(count: float) -> str:
    return f"{count / 2**20:.1f} MiB"


def disk_bytes(recipe: Any, trainable: list[int], buckets: list[tuple[int, int]], vae_scale: int = 8) -> DiskEstimate:
    """What a run writes, from its trainable tensor sizes and the buckets of its images."""
    cfg = recipe.train
    latents = 0
    if cfg.cache_latents:  # mean and std, float32, 4 channels at 1/8 of the bucket, plus the file header
        per_flip = sum(2 * 4 * 4 * (w // vae_scale) * (h // vae_scale) + 256 for w, h in buckets)
        latents = per_flip * (2 if recipe.data.flip else 1)
    saves = max(1, cfg.max_steps // max(1, cfg.save_every_steps or cfg.max_steps))
    if cfg.save_every_epochs and cfg.max_epochs:
        saves += cfg.max_epochs // cfg.save_every_epochs
    kept = min(cfg.keep_checkpoints, saves)
    adapters = adapter_bytes(recipe, trainable)
    if recipe.output.intermediate_adapters:  # one file (half the final pair) with each save before the last
        adapters += (saves - 1) * adapters // 2
    return DiskEstimate(latents, checkpoint_bytes(recipe, trainable) * (kept + 1), adapters)


def checkpoint_bytes(recipe: Any, trainable: list[int]) -> int:
    """One checkpoint: the trainable weights (float32, or bfloat16 with train.full_bf16), the EMA's float32 copy of
    them, and the optimizer state."""
    each = trained_bytes(recipe)
    weights = each * sum(trainable) + (4 * sum(trainable) if recipe.train.ema_decay else 0)
    return weights + optimizer_state_bytes(recipe.train.optimizer, trainable, each)


def trained_bytes(recipe: Any) -> int:
    """Bytes per trained value, and per gradient: float32, or bfloat16 with train.full_bf16."""
    return 2 if recipe.train.full_bf16 else 4


def adapter_bytes(recipe: Any, trainable: list[int]) -> int:
    """The exported adapter files: the kohya and the diffusers layout, each in `output.save_dtype`."""
    return 2 * sum(trainable) * (2 if recipe.output.save_dtype in ("float16", "bfloat16") else 4)


def architecture_of(base: str) -> tuple[str, str]:
    """(architecture, how it was decided) for a base model: a local folder's own U-Net config, a single file's keys,
    or a hub id's name."""
    path = Path(base).expanduser()
    config = path / "unet" / "config.json"
    if config.is_file():  # decided as training decides: two text encoders, or SD 2.x's 1024-wide cross-attention
        from .models import detect_family

        index = path / "model_index.json"
        unet = json.loads(config.read_text(encoding="utf-8"))
        family = detect_family(json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}, unet)
        why = "two text encoders" if family == "sdxl" else f"cross_attention_dim {unet.get('cross_attention_dim')}"
        return {"sdxl": "sdxl", "sd2": "sd21"}.get(family, "sd15"), f"{path} ({why})"
    if path.is_file() and path.suffix == ".safetensors":
        from .base_files import read_facts

        family = read_facts(path).family
        return {"sdxl": "sdxl", "sd2": "sd21"}.get(family, "sd15"), f"the keys of {path.name}"
    name = base.lower()
    if "xl" in name or "pony" in name or "illustrious" in name or "noob" in name:
        return "sdxl", f"the hub id {base!r} (an SDXL name)"
    if "2-1" in name or "2.1" in name or "sd2" in name or "v2" in name:
        return "sd21", f"the hub id {base!r} (an SD 2.x name)"
    return "sd15", f"the hub id {base!r} (assumed SD 1.x)"


def dataset_rows(recipe: Any) -> int:
    """How many rows the recipe's prepared dataset folders' metadata.jsonl hold (0 before `lorakit prepare`)."""
    return len(_prepared_rows(recipe))


def epoch_copies(recipe: Any) -> dict[tuple[int, int], int]:
    """How many images an epoch of the prepared dataset shows in each bucket, repeats counted (class images of
    [prior] not counted). Empty when the dataset is not prepared."""
    copies: dict[tuple[int, int], int] = {}
    for bucket, repeats in _bucketed_rows(recipe):
        copies[bucket] = copies.get(bucket, 0) + repeats
    return copies


def _bucketed_rows(recipe: Any) -> list[tuple[tuple[int, int], int]]:
    """(bucket, appearances per epoch) of every prepared row with a size, at `data.resolution` and at each of
    `data.extra_resolutions`: its nearest bucket there (what train assigns), and its own repeats times its folder's
    `data.num_repeats`."""
    from .buckets import make_buckets, nearest_bucket

    rows = [(w, h, r) for w, h, r in _prepared_rows(recipe) if w > 0 and h > 0]
    bucketed = []
    for side in _sides(recipe):
        buckets = make_buckets(side, 64) or [(side, side)]
        bucketed += [(nearest_bucket(w, h, buckets), r) for w, h, r in rows]
    return bucketed


def _sides(recipe: Any) -> list[int]:
    """The resolutions a run trains at: `data.resolution`, then `data.extra_resolutions`."""
    return [recipe.data.resolution, *recipe.data.extra_resolutions]


def _prepared_rows(recipe: Any) -> list[tuple[int, int, int]]:
    """(width, height, appearances per epoch) of every row of the prepared dataset folders' metadata.jsonl; 0, 0
    for a row without a readable size."""
    folders = [recipe.data.folder] if isinstance(recipe.data.folder, str) else list(recipe.data.folder)
    counts = recipe.data.num_repeats if isinstance(recipe.data.num_repeats, list) else [recipe.data.num_repeats]
    rows = []
    for index, folder in enumerate(folders):
        metadata = Path(folder).expanduser() / "metadata.jsonl"
        if not metadata.is_file():
            continue
        repeats = counts[min(index, len(counts) - 1)]
        for line in metadata.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line:
                continue
            try:
                row = json.loads(line)
                rows.append((int(row["width"]), int(row["height"]), repeats * int(row.get("repeats", 1))))
            except (ValueError, KeyError, TypeError, AttributeError):
                rows.append((0, 0, repeats))
    return rows


def largest_bucket(recipe: Any) -> tuple[tuple[int, int], str]:
    """The largest bucket the run trains at: each prepared image's nearest bucket at `data.resolution` (what train
    assigns), or the square one when the dataset is not prepared yet (or the run is a `[slider]`, which has none)."""
    side = max(_sides(recipe))
    if recipe.slider is not None:
        return (side, side), f"{side}x{side}: a [slider] draws its latents at data.resolution, square"
    trained = [bucket for bucket, _ in _bucketed_rows(recipe)]
    where = "data.resolution" if side == recipe.data.resolution else "data.extra_resolutions"
    if trained:
        largest = max(trained, key=lambda b: b[0] * b[1])
        return largest, f"the largest of {len(trained)} images of the dataset at {where} {side}"
    return (side, side), f"{side}x{side} assumed (no prepared dataset yet: run `lorakit prepare` for the real one)"


def _component_names(architecture: str) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if architecture == "sdxl" else ["text_encoder"]


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "float8": 1}.get(name, 2)


def compute_dtype(recipe: Any) -> str:
    """The dtype the frozen weights compute in: `model.weight_dtype`, or for float8 the autocast dtype its stored
    weights dequantize to (float32 without autocast); also the dtype the base is read in."""
    from .recipe import AUTOCAST_DTYPES

    if recipe.model.weight_dtype != "float8":
        return recipe.model.weight_dtype
    return AUTOCAST_DTYPES.get(recipe.train.mixed_precision, "float32")


@functools.cache
def float8_sizes(architecture: str, component: str, compute: str, folder: str | None = None) -> tuple[int, int]:
    """(bytes of the component's weights with `model.weight_dtype = "float8"`, values in its largest stored weight),
    counted on the meta device by the rule `lorakit.float8` stores them by."""
    from .float8 import KEPT_IN_UNET, largest_weight, stored_bytes

    module = _meta_module(architecture, component, folder)
    kept = KEPT_IN_UNET if component == "unet" else ()
    return stored_bytes(module, _dtype_bytes(compute), kept), largest_weight(module, kept)


def own_configs(recipe: Any, architecture: str) -> str | None:
    """The local diffusers folder whose component configs describe the run's models: `model.base`, or for a single
    file `model.config`, when it is one on disk with a config.json for every component; None for hub ids and for
    files read with the shipped configs."""
    components = ["unet", "vae", *_component_names(architecture)]
    for source in (recipe.model.base, recipe.model.config):
        if source and all((Path(source).expanduser() / c / "config.json").is_file() for c in components):
            return str(Path(source).expanduser().resolve())
    return None


@functools.cache
def _meta_module(architecture: str, component: str, folder: str | None = None) -> Any:
    """The frozen base component on the meta device, built once per process (adapters are counted on copies)."""
    from .architectures import build_on_meta

    return build_on_meta(architecture, component, folder).requires_grad_(False)


@functools.cache
def parameter_count(architecture: str, component: str, folder: str | None = None) -> int:
    """Parameters of one component (the shipped config, or `folder`'s own; meta device)."""
    return sum(p.numel() for p in _meta_module(architecture, component, folder).parameters())


@functools.lru_cache(maxsize=64)
def _adapter_sizes(
    architecture: str,
    component: str,
    lora: tuple,
    folder: str | None,
    blocks: tuple = (None, None, None, 0.0),
    block_ranks: tuple = (None, None, None, None),
) -> tuple[int, ...]:
    from .adapters import block_ranks as ranks_by_block
    from .adapters import (
        checked_block_weights,
        conv_block_ranks,
        inject_lora,
        lora_parameters,
        resolve_block_weights,
        zero_rate_modules,
    )

    rank, alpha, targets, conv_rank, conv_alpha, use_dora, kind, factor, both, effective = lora
    module = copy.deepcopy(_meta_module(architecture, component, folder))
    targets = list(targets) if isinstance(targets, tuple) else targets
    skipped: tuple[str, ...] = ()
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv_ranks: dict[str, int] = {}
    conv_alphas: dict[str, float] = {}
    if component == "unet":  # blocks at a block-wise rate or rank of 0 get no adapter, as in training
        *given, threshold = blocks
        weights = resolve_block_weights(tuple(given), threshold, dict(module.config))
        skipped = zero_rate_modules(module, targets, weights, checked_block_weights(weights, dict(module.config)))
        per_block = [list(v) if v is not None else None for v in block_ranks]
        if per_block[0] is not None:
            ranks, alphas = ranks_by_block(module, targets, per_block[0], per_block[1], alpha)
        if per_block[2] is not None:  # the 3x3 convolutions' own (conv_block_ranks)
            conv_alpha_given = alpha if conv_alpha is None else conv_alpha
            conv_ranks, conv_alphas = conv_block_ranks(module, targets, per_block[2], per_block[3], conv_alpha_given)
    inject_lora(
        module,
        component,
        rank=rank,
        lora_alpha=alpha,
        dropout=0.0,
        target_modules=targets,
        conv_rank=conv_rank,
        conv_alpha=conv_alpha,
        use_dora=use_dora,
        skip_modules=skipped,
        kind=kind,
        lycoris_options={"decompose_factor": factor, "decompose_both": both, "use_effective_conv2d": effective},
        module_ranks=ranks,
        module_alphas=alphas,
        conv_module_ranks=conv_ranks,
        conv_module_alphas=conv_alphas,
    )
    return tuple(p.numel() for p in lora_parameters(module))


def adapter_sizes(
    architecture: str, component: str, lora: Any, folder: str | None = None, train: Any = None
) -> list[int]:
    """Element counts of the tensors peft adds to one component for the recipe's [lora] section (and, with the
    [train] section, without the U-Net blocks its block-wise rates set to 0)."""
    targets = tuple(lora.target_modules) if isinstance(lora.target_modules, list) else lora.target_modules
    key = (
        lora.rank,
        lora.lora_alpha,
        targets,
        lora.conv_rank,
        lora.conv_alpha,
        lora.use_dora,
        lora.type,
        lora.decompose_factor,
        lora.decompose_both,
        lora.use_effective_conv2d,
    )
    blocks: tuple = (None, None, None, 0.0)
    if train is not None:  # hashable, for the cache
        given = (train.down_lr_weight, train.mid_lr_weight, train.up_lr_weight)
        blocks = (*(tuple(w) if isinstance(w, list) else w for w in given), train.block_lr_zero_threshold)
    per_block = tuple(
        tuple(v) if v is not None else None
        for v in (lora.block_ranks, lora.block_alphas, lora.conv_block_ranks, lora.conv_block_alphas)
    )
    return list(_adapter_sizes(architecture, component, key, folder, blocks, per_block))


def _encoder_widths(architecture: str, folder: str | None) -> list[int]:
    """The hidden width of each text encoder (CLIP-L 768, OpenCLIP bigG 1280, ...)."""
    return [_meta_module(architecture, c, folder).config.hidden_size for c in _component_names(architecture)]


def _resident_because(train_te: bool, recipe: Any) -> str:
    """Why frozen text encoders stay on the GPU for the whole run (empty when they are trained)."""
    if train_te:
        return ""
    if recipe.embedding is not None:
        return ", resident for [embedding]"
    return ", resident: slider prompts shuffled" if recipe.slider is not None else ", resident: captions vary"


def estimate(
    recipe: Any,
    architecture: str | None = None,
    *,
    counts: dict[str, int] | None = None,
    trainable: list[int] | None = None,
    bucket: tuple[int, int] | None = None,
    stored: dict[str, int] | None = None,
) -> MemoryEstimate:
    """The phases and parts of the run `recipe` describes. `counts` (parameters per component), `stored` (bytes of
    each component's frozen weights as they sit on the GPU) and `trainable` (element counts of the adapter tensors)
    come from the loaded models when `train` asks; otherwise they are counted on the meta device."""
    architecture = architecture or architecture_of(recipe.model.base)[0]
    bucket, source = (bucket, "the largest bucket of the dataset") if bucket else largest_bucket(recipe)
    cfg, lora = recipe.train, recipe.lora
    result = MemoryEstimate(architecture, bucket, source, cfg.batch_size)
    folder = own_configs(recipe, architecture)
    shipped = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL"}[architecture]
    result.configs = f"the base's own configs in {folder}" if folder else f"lorakit's {shipped} configs"
    dtype, compute = recipe.model.weight_dtype, compute_dtype(recipe)
    only = recipe.embedding is not None and recipe.embedding.only  # textual inversion: no LoRA at all
    train_te = recipe.trains_text_encoder(architecture == "sdxl")
    slider = recipe.slider is not None  # prompts alone: no images to encode
    encoders = _component_names(architecture)
    if counts is None:
        counts = {c: parameter_count(architecture, c, folder) for c in ["unet", "vae", *encoders]}
    if trainable is None:
        trained = [] if only else ["unet", *(encoders if train_te else [])]
        trainable = [n for c in trained for n in adapter_sizes(architecture, c, lora, folder, cfg)]
        if recipe.embedding is not None:  # one (vectors x width) tensor per text encoder
            trainable += [recipe.embedding.vectors * width for width in _encoder_widths(architecture, folder)]
    vae_dtype_bytes = 4  # every VAE stays float32 (SD VAEs overflow in fp16) and encodes outside autocast
    # frozen encoders with fixed captions are cached, then leave; new token vectors train through them
    resident_encoders = train_te or recipe.text_varies or recipe.embedding is not None
    each = trained_bytes(recipe)
    trained_dtype = "bfloat16" if each == 2 else "float32"
    adapter = sum(trainable) * each
    state = optimizer_state_bytes(cfg.optimizer, trainable, each)
    largest = 0  # float8: values of the largest stored weight, dequantized for one layer at a time
    in_float8 = dtype == "float8"
    if in_float8:
        float8 = ["unet", *(encoders if recipe.model.float8_text_encoders else [])]
        sizes = {c: float8_sizes(architecture, c, compute, folder) for c in float8}
        largest = max(n for _, n in sizes.values())
        stored = stored or {
            c: sizes[c][0] if c in sizes else counts[c] * _dtype_bytes(compute) for c in ["unet", *encoders]
        }
        dtype = f"float8 + {compute}"  # how the parts below name it
    if stored is None:
        stored = {c: counts[c] * _dtype_bytes(dtype) for c in ["unet", *encoders]}
    encoder_dtype = compute if in_float8 and not recipe.model.float8_text_encoders else dtype
    weights = {
        "U-Net": stored["unet"],
        "text encoders": sum(stored[c] for c in encoders),
        "VAE": counts["vae"] * vae_dtype_bytes,
    }

    def add(phase: str, name: str, count: float, how: str = "counted") -> None:
        result.parts.append(Part(phase, name, count / GIB, how))

    result.trainable = trainable
    read = _dtype_bytes(compute)  # float8 weights are stored after loading, from the compute dtype
    result.loaded = {  # loading reads every component into system memory; phases then move them to the GPU
        f"U-Net {compute}": counts["unet"] * read / GIB,
        f"text encoders {compute}": sum(counts[c] for c in encoders) * read / GIB,
        "VAE float32": weights["VAE"] / GIB,
    }
    pixels = bucket[0] * bucket[1]
    if cfg.cache_latents and not slider:  # one model on the GPU at a time (train.setup._fill_caches): the VAE alone
        add("latent caching", "VAE weights (float32)", weights["VAE"])
        add(
            "latent caching",
            f"VAE encode of one {bucket[0]}x{bucket[1]} image",
            pixels * vae_dtype_bytes * VAE_ENCODE * GIB,
            "modelled: one SDXL reading (H200), scaled by pixels and dtype",
        )
    if not resident_encoders:  # frozen encoders and fixed captions: encoded once, with the trained modules parked
        add("text caching", f"text encoder weights ({encoder_dtype})", weights["text encoders"])
        hidden = sum(_encoder_widths(architecture, folder))
        add(
            "text caching",
            "encoding one caption (77 tokens, every layer's hidden states)",
            77 * hidden * 4 * 24,
            "modelled: 24 float32 hidden-state-sized tensors live at once",
        )
    step = "training step"
    add(step, f"U-Net weights ({dtype})", weights["U-Net"])
    dequantized = ("float8: the largest stored weight, dequantized for its layer", largest * _dtype_bytes(compute))
    if largest:
        add(step, *dequantized)
    if resident_encoders:
        add(
            step,
            f"text encoder weights ({encoder_dtype}){_resident_because(train_te, recipe)}",
            weights["text encoders"],
        )
    if not cfg.cache_latents and not slider:
        add(step, "VAE weights (encodes every step)", weights["VAE"])
    trained_kind, trained_short = ("token vectors", "token") if only else ("LoRA weights", "LoRA")
    add(step, f"{trained_kind} ({trained_dtype}, {sum(trainable):,} parameters)", adapter)
    add(step, f"{trained_short} gradients ({trained_dtype})", adapter)
    add(step, f"optimizer state ({cfg.optimizer})", state)
    family = "sdxl" if architecture == "sdxl" else "sd"
    per_sample = ACTIVATIONS[(family, cfg.gradient_checkpointing)] * (pixels / 64)
    # [preservation]: each image also runs with its class caption; [slider]: each latent at strengths +1 and -1
    doubled = " x2 ([preservation])" if recipe.preserving else " x2 ([slider]: +1 and -1)" if slider else ""
    add(
        step,
        f"activations, batch {cfg.batch_size}{doubled} at {bucket[0]}x{bucket[1]}"
        f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}",
        per_sample * cfg.batch_size * (2 if doubled else 1) * GIB,
        "modelled: published SDXL readings and an H200 SD 1.5 reading, per latent pixel",
    )
    update = "optimizer step"  # activations are freed by then; the gradients are still held
    add(update, f"U-Net weights ({dtype}) and {trained_kind}", weights["U-Net"] + adapter)
    if resident_encoders:
        add(update, "text encoder weights", weights["text encoders"])
    add(
        update,
        f"{trained_short} gradients and optimizer state",
        adapter + state,
    )
    rounding = cfg.rounds_stochastically  # the step runs on float32 copies (optim.step_rounding_stochastically)
    at_once = max(sum(trainable[i] for i in run) for run in chunked(trainable, rounding_chunk(cfg.optimizer)))
    if cfg.optimizer == "adamw":  # off CUDA the multi-tensor kernel holds one copy of the update
        update_bytes = at_once * 4 if rounding else adapter
        add(update, "AdamW's update of every LoRA tensor at once (CUDA's fused kernel: none)", update_bytes, "counted")
    if rounding:
        lifted = STATE_IN_PARAMETER_DTYPE.get(cfg.optimizer, 0)
        state_copies = f", their gradients and {lifted} state tensors" if lifted else " and their gradients"
        add(
            update,
            f"stochastic rounding: float32 copies of {at_once:,} trained values{state_copies} during the step",
            at_once * (4 + (4 - each) * (1 + lifted)),
            "counted",
        )
    if recipe.sample.prompts:
        add("sampling", f"U-Net weights ({dtype})", weights["U-Net"])
        if largest:
            add("sampling", *dequantized)
        add("sampling", "text encoder and VAE weights", weights["text encoders"] + weights["VAE"])
        add("sampling", "LoRA weights and optimizer state", adapter + state)
        add(
            "sampling",
            "denoising and decoding one image",
            pixels * vae_dtype_bytes * VAE_ENCODE * GIB,
            "modelled: as the VAE encode",
        )
    return result


# ---- activations counted on the meta device --------------------------------------------------------------------

# The modules diffusers' gradient checkpointing wraps one by one: with it on, only their inputs stay saved, and the
# backward pass recomputes one of them at a time.
CHECKPOINTED = ("ResnetBlock2D", "Transformer2DModel", "DualTransformer2DModel")


def _kernel_attention() -> Any:
    """scaled_dot_product_attention as the fused kernels (flash, memory-efficient, PyTorch's CPU flash) run it for
    autograd: they keep q, k, v, the output and one float32 log-sum-exp per query, never the attention matrix
    that the meta device's reference path would keep."""
    import torch

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value):
            out = query.new_empty((*query.shape[:-1], value.shape[-1]))
            lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
            ctx.save_for_backward(query, key, value, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            query, key, value, _, _ = ctx.saved_tensors
            return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        return Attention.apply(query, key, value)

    return attention


def _saved_bytes(unet: Any, inputs: dict[str, Any], per_unit: dict[str, int] | None = None) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one U-Net forward on the meta device (each
    tensor once, however many operations save it; weights are not activations). With `per_unit`, also the bytes
    each checkpointable module keeps, by module name."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    weights = {id(t) for t in (*unet.parameters(), *unet.buffers())}
    kept: dict[int, tuple[Any, int]] = {}
    running: list[str] = []

    def pack(tensor: Any) -> Any:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in weights and id(base) not in kept:
            kept[id(base)] = (base, base.numel() * base.element_size())  # holding it keeps its id unique
            if per_unit is not None and running:
                per_unit[running[0]] = per_unit.get(running[0], 0) + kept[id(base)][1]
        return tensor

    def enter(name: str) -> Any:
        return lambda _module, _args: running.append(name)  # returns None: the inputs stay as they are

    def leave(_module: Any, _args: Any, _output: Any) -> None:
        running.pop()

    handles = []
    if per_unit is not None:
        for name, module in unet.named_modules():
            if type(module).__name__ in CHECKPOINTED:
                handles.append(module.register_forward_pre_hook(enter(name)))
                handles.append(module.register_forward_hook(leave))
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _kernel_attention()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(**inputs)
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()
    return sum(size for _, size in kept.values())


def counted_activations(
    unet: Any, batch: int, bucket: tuple[int, int], vae_scale: int, checkpointing: bool, tokens: int = 77
) -> int:
    """Activation bytes of one training step of `unet` (on the meta device, with its adapters, in the dtype it
    computes in), counted rather than modelled: what autograd keeps for the backward pass at `batch` images of
    `bucket` pixels. With gradient checkpointing that is the checkpointed modules' inputs plus the largest one's
    own activations, which the backward pass recomputes one module at a time.

    This is how CPU training behaves (float32, PyTorch's fused CPU attention); tests/test_memory.py holds it to the
    bytes the tiny models really allocate. GPU plans use the per-pixel figures calibrated on fp16 readings
    (ACTIVATIONS), because autocast's casts cannot be run on the meta device.
    """
    import copy

    import torch

    config = unet.config
    dtype = next(unet.parameters()).dtype
    height, width = bucket[1] // vae_scale, bucket[0] // vae_scale
    with torch.device("meta"):
        inputs = {
            "sample": torch.empty(batch, config.in_channels, height, width, dtype=dtype),
            "timestep": torch.zeros(batch, dtype=torch.long),
            "encoder_hidden_states": torch.empty(batch, tokens, config.cross_attention_dim, dtype=dtype),
        }
        if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and six size numbers
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.empty(batch, pooled, dtype=dtype),
                "time_ids": torch.empty(batch, 6, dtype=dtype),
            }
    module = copy.deepcopy(unet).train()
    module.disable_gradient_checkpointing()
    units: dict[str, int] = {}
    whole = _saved_bytes(module, inputs, units)
    if not checkpointing:
        return whole
    module.enable_gradient_checkpointing()
    return _saved_bytes(module, inputs) + max(units.values(), default=0)


def find_gpu(name: str) -> float:
    """The memory (GiB) of a card named like one in GPUS; RecipeError lists the close names otherwise."""
    import difflib

    wanted = name.lower().replace(" ", "")
    for known, gib in GPUS.items():
        if known.lower().replace(" ", "") == wanted:
            return gib
    matches = [k for k in GPUS if wanted in k.lower().replace(" ", "")]
    if len(matches) == 1:
        return GPUS[matches[0]]
    close = matches or difflib.get_close_matches(name, list(GPUS), n=4, cutoff=0.3)
    raise RecipeError(
        f"--gpu {name!r}: not a card lorakit knows; close: {', '.join(close) or 'none'}; or give --vram GiB"
    )
