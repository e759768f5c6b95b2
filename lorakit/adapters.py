"""LoRA injection with peft: target presets, `inject_adapter_in_model`, and reading the trained factors back.

The presets name modules by *role*, not by path, so they hold for every Stable Diffusion U-Net
family and CLIP text encoder. Injection, scaling and the forward pass are peft's; this module
only decides where adapters go and extracts `(down, up, alpha)` triples for export.

Why peft directly and not the models' `add_adapter`: transformers' `add_adapter` (and, since 5.24,
`set_adapter`, `enable_adapters`, `get_adapter_state_dict` ...) first checks the installed peft against
a minimum of its own. transformers 5.24 asks for peft >= 0.22 before any such peft was released, so
every text-encoder LoRA failed inside transformers although peft itself could inject it. Training needs
none of the bookkeeping those wrappers add (lorakit reads and writes adapter tensors itself), so one
library's release cannot switch training off. The U-Net goes the same way so both components are
adapted by one code path.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from . import lycoris
from .errors import AdapterError, RecipeError
from .recipe import block_curve

# Inside every transformer block of the U-Net (Transformer2DModel): the attention projections...
_UNET_ATTENTION = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
# ...and, for the kohya default set, also the feed-forward and the block's in/out projections.
_UNET_TRANSFORMER = rf"({_UNET_ATTENTION}|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)|proj_in|proj_out)"
# LoCon: also every conv (and the time-embedding projection) of the ResNets and the down/up-samplers.
_UNET_CONV = r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|downsamplers\.0\.conv|upsamplers\.0\.conv)"
_TE_ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_TE_TRANSFORMER = rf"({_TE_ATTENTION}|mlp\.(fc1|fc2))"

# peft full-matches a string `target_modules` against each module path.
PRESETS: dict[str, dict[str, str]] = {
    "attention": {
        "unet": rf".*attentions\.\d+\.{_UNET_ATTENTION}",
        "text_encoder": rf".*encoder\.layers\.\d+\.{_TE_ATTENTION}",
    },
    "transformer": {
        "unet": rf".*attentions\.\d+\.{_UNET_TRANSFORMER}",
        "text_encoder": rf".*encoder\.layers\.\d+\.{_TE_TRANSFORMER}",
    },
    "transformer+conv": {
        "unet": rf"(.*attentions\.\d+\.{_UNET_TRANSFORMER}|.*{_UNET_CONV})",
        "text_encoder": rf".*encoder\.layers\.\d+\.{_TE_TRANSFORMER}",
    },
}

ADAPTER_NAME = "default"
_TE_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LoraModule:
    """One adapted module: delta W = up @ down * (alpha / rank)."""

    down: torch.Tensor  # [rank, in] (conv: [rank, in, kh, kw])
    up: torch.Tensor  # [out, rank] (conv: [out, rank, 1, 1])
    alpha: float
    # DoRA: the trained norm of each output row of W + delta W (peft's lora_magnitude_vector), [out]; the adapted
    # weight is magnitude * (W + delta W) / ||W + delta W|| row by row.
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight shape of the module it changes (LycorisModule has the same attribute)."""
        return (self.up.shape[0], *self.down.shape[1:])

    @property
    def numel(self) -> int:
        """Stored values: both factors, and the DoRA magnitudes."""
        return self.down.numel() + self.up.numel() + (self.magnitude.numel() if self.magnitude is not None else 0)

    def peft_magnitude(self) -> torch.Tensor | None:
        """The DoRA magnitude in peft's (and diffusers') shape: [out] for Linear, [1, out, 1, 1] for Conv2d."""
        if self.magnitude is None:
            return None
        return self.magnitude.reshape(1, -1, 1, 1) if self.down.ndim == 4 else self.magnitude.reshape(-1)


# component name ("unet", "text_encoder", "text_encoder_2") -> module path -> factors (LoRA, or LoKr/LoHa)
LoraState = dict[str, dict[str, "LoraModule | lycoris.LycorisModule"]]


def scaled_factors(lora: LoraModule, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r] with scale * alpha / rank folded in, down [r, in * kh * kw]) in float32."""
    up = lora.up.float().reshape(lora.up.shape[0], -1) * (scale * lora.alpha / lora.rank)
    return up, lora.down.float().reshape(lora.rank, -1)


def lora_from_factors(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> LoraModule:
    """A LoraModule with alpha = rank (any scale already folded into the factors) for a weight of `shape`, from the
    flat factors up [out, r] and down [r, in * kh * kw] (convs get down [r, in, kh, kw] and up [out, r, 1, 1])."""
    rank = down.shape[0]
    down = down.reshape(rank, *shape[1:])
    up = up.reshape(up.shape[0], rank, *((1, 1) if len(shape) == 4 else ()))
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(rank))


def kept_rank(singular_values: torch.Tensor, rank: int, energy: float | None = None) -> int:
    """How many of a change's singular values (descending) a rank-`rank` approximation keeps: `rank`, or with
    `energy` (0 < energy <= 1) the fewest, at most `rank`, whose squares hold that share of the total (kohya's
    dynamic `sv_fro` resize, stated for the squared norm); at least one."""
    keep = min(rank, singular_values.shape[0])
    if energy is None:
        return keep
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 1
    enough = int((squares.cumsum(0) < energy * total * (1 - 1e-12)).sum()) + 1
    return max(1, min(keep, enough))


def best_factors(
    matrix: torch.Tensor, rank: int, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up [out, k], down [k, in], every singular value) of a flat matrix: its best approximation of rank k in the
    Frobenius norm (Eckart-Young), k = `rank` or what `kept_rank` picks for `energy`, by a full SVD; each factor
    carries the square root of the singular values. In the matrix's dtype, on its device."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = kept_rank(s, rank, energy)
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep], s


def delta_weight(lora: LoraModule, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    up, down = scaled_factors(lora, scale)
    return (up @ down).reshape(shape)


def weight_change(lora: LoraModule, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """What one adapter at `scale` adds to `weight`, as peft applies it (so diffusers draws the same).

    LoRA: scale * delta W. DoRA: every output row of W + scale * delta W rescaled to the trained magnitude,
    minus W, i.e. (m / n - 1) W + (m / n) scale delta W with n the row norms of W + scale * delta W.
    """
    if isinstance(lora, lycoris.LycorisModule):  # LoKr / LoHa: its own update, the shape checked against the base
        return lora.delta(scale).reshape(weight.shape)
    delta = delta_weight(lora, tuple(weight.shape), scale)
    if lora.magnitude is None:
        return delta
    weight = weight.float()
    rows = (-1,) + (1,) * (weight.dim() - 1)
    norm = (weight + delta).reshape(weight.shape[0], -1).norm(dim=1).reshape(rows)
    ratio = lora.magnitude.float().reshape(rows) / norm
    return (ratio - 1) * weight + ratio * delta


def adapted_weight(weight: torch.Tensor, parts: list[tuple[object, float]]) -> torch.Tensor:
    """`weight` in float32 plus every (module, scale) of `parts`' change, each as peft applies it (`weight_change`):
    what merging bakes in and what `generate` writes into weights diffusers cannot adapt itself."""
    return weight.float() + sum(weight_change(module, weight, scale) for module, scale in parts)


def is_dora(state: LoraState) -> bool:
    """Whether any module of `state` is a DoRA module (has a magnitude)."""
    return any(getattr(lora, "magnitude", None) is not None for modules in state.values() for lora in modules.values())


def lycoris_kind(state: LoraState) -> str | None:
    """ "lokr" or "loha" when `state` holds LoKr/LoHa modules (of one kind or the first found), else None."""
    return next(
        (m.kind for modules in state.values() for m in modules.values() if isinstance(m, lycoris.LycorisModule)),
        None,
    )


def text_encoder_kind(component: str) -> str:
    """The preset family of a component name: "unet" or "text_encoder"."""
    return "text_encoder" if component.startswith("text_encoder") else "unet"


def matching_modules(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """The module paths peft would adapt for `targets` (a regex or a list of name suffixes)."""

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            names.append(name)
    return names


def resolve_targets(target_modules: str | list[str], component: str) -> str | list[str]:
    """The peft `target_modules` for one component, from a preset name or an explicit list."""
    if isinstance(target_modules, str):
        return PRESETS[target_modules][text_encoder_kind(component)]
    return list(target_modules)


def inject_lora(
    model: torch.nn.Module,
    component: str,
    *,
    rank: int,
    lora_alpha: float,
    dropout: float,
    target_modules: str | list[str],
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    use_dora: bool = False,
    skip_layers: tuple[int, ...] = (),
    skip_modules: tuple[str, ...] = (),
    kind: str = "lora",
    lycoris_options: dict | None = None,
    module_ranks: dict[str, int] | None = None,
    module_alphas: dict[str, float] | None = None,
    conv_module_ranks: dict[str, int] | None = None,
    conv_module_alphas: dict[str, float] | None = None,
) -> list[str]:
    """Add a trainable LoRA (or, with `kind`, LoKr / LoHa) adapter to `model` with peft and return the adapted
    module paths. `lycoris_options` are peft's LoKr/LoHa config fields (decompose_factor, decompose_both,
    use_effective_conv2d).

    3x3 convolutions get `conv_rank` / `conv_alpha` when given (LoCon), through peft's per-module
    rank and alpha patterns. `skip_layers` are text-encoder layer indices left without adapters (with clip
    skip N the last N - 1 layers never reach the U-Net: their adapters would get no gradient, which DDP
    refuses). `skip_modules` are module paths left without adapters (U-Net blocks at a block-wise rate of 0).
    `module_ranks` / `module_alphas` give modules by path their own rank and alpha (`block_ranks`); a module at
    rank 0 gets no adapter. `conv_module_ranks` / `conv_module_alphas` do the same for the 3x3 convolutions
    (`conv_block_ranks`), which then follow them instead of `module_ranks`.
    Raises RecipeError when the targets match nothing, or when a text
    encoder would get q/k/v without out_proj (diffusers cannot load such a file).
    """

    targets = resolve_targets(target_modules, component)
    spatial_all = set(spatial_modules(model, target_modules, component))
    conv_ranks = conv_module_ranks or {}
    zero = [p for p, r in (module_ranks or {}).items() if r == 0 and not (conv_ranks and p in spatial_all)]
    zero += [p for p, r in conv_ranks.items() if r == 0 and p in spatial_all]
    skip_modules = (*skip_modules, *zero)
    excluded = [rf".*encoder\.layers\.({'|'.join(map(str, skip_layers))})\..*"] if skip_layers else []
    excluded += [re.escape(path) for path in skip_modules]
    exclude = "|".join(f"({pattern})" for pattern in excluded) if excluded else None
    names = [n for n in matching_modules(model, targets) if exclude is None or not re.fullmatch(exclude, n)]
    if not names:
        raise RecipeError(
            f"lora.target_modules: {target_modules!r} matches no Linear or Conv2d module in the "
            f"{component}; use 'attention', 'transformer' or module names such as 'to_q'"
        )
    if text_encoder_kind(component) == "text_encoder":
        present = {p for p in _TE_ATTENTION_PROJECTIONS if any(n.endswith("." + p) for n in names)}
        if present and present != set(_TE_ATTENTION_PROJECTIONS):
            raise RecipeError(
                f"lora.target_modules: the {component} adapts {sorted(present)} but not all of "
                f"{list(_TE_ATTENTION_PROJECTIONS)}; adapt all four attention projections together"
            )
    spatial = [n for n in names if n in spatial_all]
    conv_alphas = conv_module_alphas or {}
    patterns = {
        "rank_pattern": {re.escape(n): conv_ranks.get(n, conv_rank) for n in spatial if conv_ranks.get(n, conv_rank)},
        "alpha_pattern": {
            re.escape(n): conv_alphas.get(n, conv_alpha) for n in spatial if conv_alphas.get(n, conv_alpha) is not None
        },
    }
    # per-module ranks (block_ranks) reach the linear and 1x1 layers; 3x3 convolutions keep conv_rank, as kohya's
    # block_dims leave them to conv_block_dims
    chosen = [n for n in names if n not in spatial]
    patterns["rank_pattern"] |= {re.escape(n): (module_ranks or {})[n] for n in chosen if n in (module_ranks or {})}
    patterns["alpha_pattern"] |= {re.escape(n): (module_alphas or {})[n] for n in chosen if n in (module_alphas or {})}
    if kind == "lora":
        config = LoraConfig(
            r=rank,
            lora_alpha=lora_alpha,
            lora_dropout=dropout,
            target_modules=targets,
            exclude_modules=exclude,
            init_lora_weights=True,
            use_dora=use_dora,
            **patterns,
        )
    else:
        config = lycoris.peft_config(
            kind,
            r=rank,
            alpha=lora_alpha,
            target_modules=targets,
            exclude_modules=exclude,
            **patterns,
            **(lycoris_options or {}),
        )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    return names


def spatial_modules(model: torch.nn.Module, target_modules: str | list[str], component: str = "unet") -> list[str]:
    """The 3x3 (wider than 1x1) convolutions among the modules the targets reach."""
    modules = dict(model.named_modules())
    return [n for n in matching_modules(model, resolve_targets(target_modules, component)) if _is_spatial(modules[n])]


def _is_spatial(module: torch.nn.Module) -> bool:
    """A convolution with a kernel wider than 1x1 (LoCon's `conv_rank`, kohya's `conv_dim`)."""
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def cap_update_norms(models: dict[str, torch.nn.Module], max_norm: float) -> tuple[int, float]:
    """Max-norm regularisation (kohya's `scale_weight_norms`): every LoRA module whose update, scaling included,
    has a Frobenius norm above `max_norm` gets both factors multiplied by sqrt(max_norm / norm), which brings the
    norm to `max_norm` and keeps the update's direction. Returns (modules scaled, the largest norm before scaling).

    The norm comes from the r x r products of the factors, ||B A||^2 = trace((B^T B)(A A^T)), so no full-size
    update is ever formed; the factors are scaled on their device and the host waits once, for the two numbers.
    """
    pairs, norms = [], []
    with torch.no_grad():
        for model in models.values():
            for module in model.modules():
                if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
                    continue
                down = module.lora_A[ADAPTER_NAME].weight
                up = module.lora_B[ADAPTER_NAME].weight
                a, b = down.float().reshape(down.shape[0], -1), up.float().reshape(up.shape[0], -1)
                trace = ((b.T @ b) * (a @ a.T).T).sum()  # trace of the product without forming it
                norms.append(trace.clamp(min=0).sqrt() * abs(module.scaling[ADAPTER_NAME]))
                pairs.append((down, up))
        if not pairs:
            return 0, 0.0
        norms_all = torch.stack([n.to(norms[0].device) for n in norms])
        factors = (max_norm / norms_all.clamp(min=max_norm)).sqrt()  # 1 where the norm is within the cap
        for (down, up), factor in zip(pairs, factors, strict=True):
            down.mul_(factor.to(down.device, down.dtype))
            up.mul_(factor.to(up.device, up.dtype))
        summary = torch.stack([(norms_all > max_norm).sum().float(), norms_all.max()]).tolist()
    return int(summary[0]), summary[1]


_DOWN = re.compile(r"down_blocks\.(\d+)\.(attentions|resnets|downsamplers)\.(\d+)\.")
_UP = re.compile(r"up_blocks\.(\d+)\.(attentions|resnets|upsamplers)\.(\d+)\.")


def unet_block_count(unet_config: dict) -> int | None:
    """How many input (and output) blocks the U-Net has as the original LDM code counts them: per resolution its
    layers plus the down/upsampler; 12 for SD 1.x/2.x, 9 for SDXL. None when the layers differ per resolution."""
    layers = unet_config.get("layers_per_block", 2)
    return len(unet_config["down_block_types"]) * (layers + 1) if isinstance(layers, int) else None


def unet_block(path: str, layers_per_block: int = 2) -> tuple[str, int] | None:
    """The LDM block a U-Net module belongs to, as kohya's block-wise rates count them: ("down", k) for
    input_blocks.k (IN k), ("mid", 0) for the middle block, ("up", k) for output_blocks.k (OUT k); None for the
    modules outside the blocks (conv_in, the time embedding, conv_out)."""
    if path.startswith("mid_block."):
        return "mid", 0
    per = layers_per_block + 1  # an input resolution: its layers and a downsampler; an output one: one more layer
    if match := _DOWN.match(path + "."):
        block, kind, index = int(match[1]), match[2], int(match[3])
        return "down", per * block + (per if kind == "downsamplers" else index + 1)
    if match := _UP.match(path + "."):
        block, kind, index = int(match[1]), match[2], int(match[3])
        return "up", per * block + (per - 1 if kind == "upsamplers" else index)
    return None


def mid_part(path: str) -> int:
    """Which of the middle block's three parts a module is in, as the original SDXL code numbers them (kohya's
    SDXL middle_block_0 / _1 / _2): the first ResNet, the attention, the second ResNet."""
    if path.startswith("mid_block.attentions."):
        return 1
    return 2 if path.startswith("mid_block.resnets.1") else 0


def is_sdxl_unet(unet_config: dict) -> bool:
    """Whether a U-Net is SDXL-shaped (its added size and text conditioning), where kohya's block lists count the
    middle block's three parts and a place before and after the blocks."""
    return unet_config.get("addition_embed_type") == "text_time"


def kohya_sdxl_position(path: str, block: tuple[str, int], blocks: int) -> int:
    """A U-Net module's place in kohya's SDXL block list (1 + 9 + 3 + 9 + 1 = 23 for SDXL): the time embedding,
    the input blocks, the middle block's three parts, the output blocks, the output layer."""
    kind, index = block
    return {"down": 1 + index, "mid": 1 + blocks + mid_part(path), "up": 4 + blocks + index}[kind]


BlockWeights = tuple[list[float] | None, float | list[float] | None, list[float] | None]  # (down, mid, up)


def resolve_block_weights(given: tuple, threshold: float, unet_config: dict) -> BlockWeights:
    """A recipe's (down, mid, up) block-wise factors for this U-Net: kohya's named curves spelled out over its
    blocks, and the factors at or below `threshold` (`block_lr_zero_threshold`) set to 0 (only those given, as
    kohya does). Lists may come as tuples (the planner's cache keys)."""
    blocks = unet_block_count(unet_config) or 0

    def resolved(value: Any) -> Any:
        if isinstance(value, str):
            value = block_curve(value, blocks)
        if isinstance(value, list | tuple):
            return [w if w > threshold else 0.0 for w in value]
        return value if value is None or value > threshold else 0.0

    down, mid, up = given
    return resolved(down), resolved(mid), resolved(up)


def checked_block_weights(weights: BlockWeights, unet_config: dict) -> int:
    """The U-Net's layers per block (which block a module is in depends on it), once the block-wise factors are
    checked against its blocks. Raises RecipeError naming the key and the number of blocks."""
    layers = unet_config.get("layers_per_block", 2)
    if weights == (None, None, None):
        return layers if isinstance(layers, int) else 2
    blocks = unet_block_count(unet_config)
    if blocks is None:
        raise RecipeError(
            "train.down_lr_weight / up_lr_weight: this U-Net has a different number of layers per block at each "
            "resolution, which block-wise rates do not describe; remove them"
        )
    for key, values, kind, tag in (
        ("down_lr_weight", weights[0], "input", "IN"),
        ("up_lr_weight", weights[2], "output", "OUT"),
    ):
        if values is not None and len(values) != blocks:
            raise RecipeError(
                f"train.{key}: {len(values)} values, but this U-Net has {blocks} {kind} blocks "
                f"({tag}00 to {tag}{blocks - 1:02d}; SD 1.x/2.x 12, SDXL 9); give {blocks}"
            )
    mid = weights[1]
    parts = 3 if is_sdxl_unet(unet_config) else 1
    if isinstance(mid, list) and len(mid) not in (1, parts):
        raise RecipeError(
            f"train.mid_lr_weight: {len(mid)} values; give one"
            + (" (or three, kohya's SDXL middle-block parts: ResNet, attention, ResNet)" if parts == 3 else "")
        )
    return layers


def zero_rate_modules(
    unet: torch.nn.Module, target_modules: str | list[str], weights: BlockWeights, layers_per_block: int
) -> tuple[str, ...]:
    """The U-Net modules the targets reach that lie in blocks at a block-wise factor of 0 (they get no adapter).
    Raises RecipeError when that is every one of them."""
    if weights == (None, None, None):
        return ()
    matched = matching_modules(unet, resolve_targets(target_modules, "unet"))
    skipped = tuple(path for path in matched if block_lr_weight(path, weights, layers_per_block) == 0)
    if skipped and len(skipped) == len(matched):
        raise RecipeError(
            "train.down_lr_weight / mid_lr_weight / up_lr_weight: every U-Net block the adapters reach is at 0, so "
            "the U-Net would learn nothing; give at least one block a factor above 0"
        )
    return skipped


def block_ranks(
    unet: torch.nn.Module,
    target_modules: str | list[str],
    ranks: list[int],
    alphas: list[float] | None,
    default_alpha: float,
    key: str = "lora.block_ranks",
) -> tuple[dict[str, int], dict[str, float]]:
    """kohya's `block_dims` / `block_alphas` for the U-Net modules the targets reach: (rank, alpha) per module path
    from one value per LDM block, IN00.., M00, OUT00.. (modules outside the blocks are left out: they keep the
    recipe's rank). A rank of 0 means no adapter. Raises RecipeError when the lists do not fit the U-Net."""
    config = dict(unet.config)
    blocks = unet_block_count(config)
    if blocks is None:
        raise RecipeError(
            f"{key}: this U-Net has a different number of layers per block at each resolution, which "
            "per-block ranks do not describe; remove it"
        )
    kohya_sdxl = is_sdxl_unet(config) and len(ranks) == 2 * blocks + 5
    if len(ranks) != 2 * blocks + 1 and not kohya_sdxl:
        raise RecipeError(
            f"{key}: {len(ranks)} values, but this U-Net has {2 * blocks + 1} blocks (IN00 to "
            f"IN{blocks - 1:02d}, M00, OUT00 to OUT{blocks - 1:02d}; SD 1.x/2.x 25, SDXL 19, or kohya's 23 for SDXL); "
            f"give {2 * blocks + 1}"
        )
    layers = config.get("layers_per_block", 2)
    found_ranks, found_alphas = {}, {}
    for path in matching_modules(unet, resolve_targets(target_modules, "unet")):
        block = unet_block(path, layers)
        if block is None:
            continue
        kind, index = block
        position = {"down": index, "mid": blocks, "up": blocks + 1 + index}[kind]
        if kohya_sdxl:
            position = kohya_sdxl_position(path, block, blocks)
        found_ranks[path] = ranks[position]
        found_alphas[path] = alphas[position] if alphas is not None else default_alpha
    return found_ranks, found_alphas


def conv_block_ranks(
    unet: torch.nn.Module,
    target_modules: str | list[str],
    ranks: list[int],
    alphas: list[float] | None,
    default_alpha: float,
) -> tuple[dict[str, int], dict[str, float]]:
    """kohya's `conv_block_dims` / `conv_block_alphas`: as `block_ranks`, for the 3x3 convolutions the targets reach
    alone."""
    spatial = set(spatial_modules(unet, target_modules))
    found = block_ranks(unet, target_modules, ranks, alphas, default_alpha, "lora.conv_block_ranks")
    conv_ranks, conv_alphas = ({p: v for p, v in f.items() if p in spatial} for f in found)
    return conv_ranks, conv_alphas


def block_lr_weight(path: str, weights: BlockWeights, layers_per_block: int = 2) -> float:
    """The factor on the U-Net learning rate of the module at `path`, from (down, mid, up) block-wise factors (1
    outside the blocks, or where unset)."""
    block = unet_block(path, layers_per_block)
    if block is None:
        return 1.0
    kind, index = block
    down, mid, up = weights
    if kind == "mid":
        if isinstance(mid, list):  # kohya's SDXL middle block in three parts, or one value in a list
            return mid[mid_part(path)] if len(mid) == 3 else mid[0]
        return 1.0 if mid is None else mid
    factors = down if kind == "down" else up
    return 1.0 if factors is None else factors[index]


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA parameters of `model` (the only ones lorakit trains)."""
    return list(named_lora_parameters(model).values())


@contextlib.contextmanager
def adapters_disabled(*models: torch.nn.Module) -> Iterator[None]:
    """The models as the base was, for the block: every adapter layer in them skipped (peft's `enable_adapters`),
    and each parameter's `requires_grad` put back as it was afterwards (turning adapters back on would otherwise
    mark every adapter factor trainable)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    trainable = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, wanted in trainable.items():
            param.requires_grad_(wanted)


@contextlib.contextmanager
def adapters_scaled(models: Iterable[torch.nn.Module], strength: float) -> Iterator[None]:
    """The models with every adapter at `strength` times its trained scale for the block (a sample's `--m`), as
    loaders apply a strength: peft's per-layer `scaling` multiplied, and put back exactly afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    layers = [layer for layer in layers if isinstance(getattr(layer, "scaling", None), dict)]
    kept = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in layer.scaling:
            layer.scaling[name] = layer.scaling[name] * strength
    try:
        yield
    finally:
        for layer, scaling in zip(layers, kept, strict=True):
            layer.scaling.update(scaling)


def freeze_except_lora(model: torch.nn.Module) -> None:
    """Freeze every base weight; leave only LoRA factors trainable."""
    for name, param in model.named_parameters():
        param.requires_grad_(_is_adapter_parameter(name))


def _is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_magnitude_vector." in name or lycoris.is_parameter(name)


def is_up_projection(name: str) -> bool:
    """Whether a trainable parameter is a LoRA up-projection (`lora_B`), the one LoRA+ speeds up."""
    return ".lora_B." in name


def extract_adapters(
    model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None
) -> dict[str, LoraModule | lycoris.LycorisModule]:
    """Every adapted module of `model`: LoRA modules (see `extract_lora`) and LoKr/LoHa modules (LyCORIS
    convention, see `lycoris.extract`)."""
    return {**extract_lora(model, weights), **lycoris.extract(model, ADAPTER_NAME, weights or {})}


def extract_lora(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, LoraModule]:
    """Read the adapter factors of every peft-adapted module of `model`, keyed by module path.

    `weights` (parameter name -> tensor, e.g. an EMA) replaces the live parameters where given.
    The alpha is returned such that `alpha / rank` equals peft's scaling for the module.
    """
    weights = weights or {}
    modules = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or ADAPTER_NAME not in lora_a:
            continue
        rank = module.r[ADAPTER_NAME]
        down_name, up_name = f"{name}.lora_A.{ADAPTER_NAME}.weight", f"{name}.lora_B.{ADAPTER_NAME}.weight"
        magnitude = _magnitude_parameter(module)
        if magnitude is not None:
            magnitude = weights.get(f"{name}.lora_magnitude_vector.{ADAPTER_NAME}.weight", magnitude).detach()
        modules[name] = LoraModule(
            down=weights.get(down_name, lora_a[ADAPTER_NAME].weight).detach(),
            up=weights.get(up_name, module.lora_B[ADAPTER_NAME].weight).detach(),
            alpha=float(module.scaling[ADAPTER_NAME] * rank),
            magnitude=magnitude.reshape(-1) if magnitude is not None else None,
        )
    return modules


def _magnitude_parameter(module: torch.nn.Module) -> torch.nn.Parameter | None:
    """The DoRA magnitude of a peft-adapted module (peft keeps it [out] for Linear, [1, out, 1, 1] for Conv2d)."""
    vectors = getattr(module, "lora_magnitude_vector", None)
    if vectors is None or ADAPTER_NAME not in vectors:
        return None
    return vectors[ADAPTER_NAME].weight


def named_lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of `model` by name (the names `extract_lora` accepts in `weights`)."""
    return {n: p for n, p in model.named_parameters() if _is_adapter_parameter(n)}


def module_at(named: dict[str, torch.nn.Module], path: str) -> torch.nn.Module | None:
    """The module an adapter file's `path` names. Files spell text-encoder paths without the `text_model.` level
    that CLIPTextModelWithProjection (SDXL's second encoder) still has, so look there too."""
    return named.get(path) or named.get("text_model." + path)


def load_lora_into(model: torch.nn.Module, modules: dict[str, LoraModule], source: str) -> None:
    """Copy adapter factors into `model`'s peft adapters, rescaled to the model's alpha / rank.

    Raises AdapterError naming the first module whose rank differs or that the model lacks.
    """

    named = dict(model.named_modules())
    for path, lora in modules.items():
        module = module_at(named, path)
        if module is None or ADAPTER_NAME not in getattr(module, "lora_A", {}):
            raise AdapterError(f"{source}: {path} is not adapted in this model; use the same lora.target_modules")
        if module.r[ADAPTER_NAME] != lora.rank:
            raise AdapterError(
                f"{source}: {path} has rank {lora.rank} but lora.rank here is "
                f"{module.r[ADAPTER_NAME]}; set lora.rank = {lora.rank}"
            )
        magnitude = _magnitude_parameter(module)
        if (magnitude is None) != (lora.magnitude is None):
            raise AdapterError(
                f"{source}: {path} is {'a DoRA' if lora.magnitude is not None else 'a plain LoRA'} module; set "
                f"lora.use_dora = {str(lora.magnitude is not None).lower()} to start from it"
            )
        with torch.no_grad():
            module.lora_A[ADAPTER_NAME].weight.copy_(lora.down)
            scale = (lora.alpha / lora.rank) / module.scaling[ADAPTER_NAME]
            module.lora_B[ADAPTER_NAME].weight.copy_(lora.up * scale)
            if magnitude is not None:
                magnitude.copy_(lora.magnitude.reshape(magnitude.shape))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
