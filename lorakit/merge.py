"""Merging: adapters into a base model, adapters into one adapter (exact or SVD), and resizing an adapter.

All maths in float32. A module's update is delta W = up @ down * (alpha / rank); for convolutions
the product is taken on the flattened factors and reshaped to the weight's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .adapters import LoraModule
from .errors import AdapterError

if TYPE_CHECKING:
    import torch

    from .adapters import LoraState


@dataclass
class Weighted:
    """An adapter state and the strength it is applied at."""

    state: LoraState
    scale: float
    name: str


def scaled_factors(lora: LoraModule, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r] with scale * alpha / rank folded in, down [r, in * kh * kw]) in float32."""
    up = lora.up.float().reshape(lora.up.shape[0], -1) * (scale * lora.alpha / lora.rank)
    return up, lora.down.float().reshape(lora.rank, -1)


def delta_weight(lora: LoraModule, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    up, down = scaled_factors(lora, scale)
    return (up @ down).reshape(shape)


def _module_from_factors(up: torch.Tensor, down: torch.Tensor, like: LoraModule) -> LoraModule:
    """A LoraModule with alpha = rank (scale folded) and `like`'s conv shapes."""
    rank = down.shape[0]
    down = down.reshape(rank, *like.down.shape[1:])
    up = up.reshape(up.shape[0], rank, *like.up.shape[2:])
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(rank))


def _paths(adapters: list[Weighted]) -> dict[tuple[str, str], list[tuple[LoraModule, float]]]:
    modules: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for adapter in adapters:
        for component, entries in adapter.state.items():
            for path, lora in entries.items():
                modules.setdefault((component, path), []).append((lora, adapter.scale))
    return modules


def _check_compatible(key: tuple[str, str], parts: list[tuple[LoraModule, float]]) -> None:
    shapes = {(p.up.shape[0], *p.down.shape[1:]) for p, _ in parts}
    if len(shapes) > 1:
        raise AdapterError(
            f"{key[0]} module {key[1]}: the adapters disagree on its shape ({sorted(shapes)}); "
            "they are for different architectures"
        )


def concat_adapters(adapters: list[Weighted]) -> LoraState:
    """One adapter whose effect is exactly the sum of the scaled inputs' effects: ranks concatenated."""
    import torch

    merged: LoraState = {}
    for key, parts in _paths(adapters).items():
        _check_compatible(key, parts)
        factors = [scaled_factors(lora, scale) for lora, scale in parts]
        up = torch.cat([u for u, _ in factors], dim=1)
        down = torch.cat([d for _, d in factors], dim=0)
        merged.setdefault(key[0], {})[key[1]] = _module_from_factors(up, down, parts[0][0])
    return merged


def _truncate(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of up @ down (QR of the thin factors, then a small SVD) and all singular values."""
    import torch

    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    new_up = (q_up @ u[:, :keep]) * root
    new_down = root[:, None] * (vh[:keep] @ q_down.T)
    return new_up.float(), new_down.float(), s


def svd_adapters(adapters: list[Weighted], rank: int) -> tuple[LoraState, dict[str, float], float]:
    """The sum of the scaled inputs at rank `rank` per module; relative Frobenius error per module and overall."""
    merged: LoraState = {}
    errors: dict[str, float] = {}
    dropped = total = 0.0
    for key, parts in _paths(adapters).items():
        _check_compatible(key, parts)
        up, down, s = _truncate(*_concat_factors(parts), rank)
        lost, whole = float((s[rank:] ** 2).sum()), float((s**2).sum())
        errors[f"{key[0]}.{key[1]}"] = (lost / whole) ** 0.5 if whole else 0.0
        dropped, total = dropped + lost, total + whole
        merged.setdefault(key[0], {})[key[1]] = _module_from_factors(up, down, parts[0][0])
    return merged, errors, (dropped / total) ** 0.5 if total else 0.0


def _concat_factors(parts: list[tuple[LoraModule, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    factors = [scaled_factors(lora, scale) for lora, scale in parts]
    return torch.cat([u for u, _ in factors], dim=1), torch.cat([d for _, d in factors], dim=0)


def resize_adapter(state: LoraState, rank: int) -> tuple[LoraState, dict[str, float], float]:
    """`state` at rank `rank` by SVD; retained energy (share of squared singular values) per module and overall."""
    merged, errors, overall = svd_adapters([Weighted(state, 1.0, "input")], rank)
    return merged, {k: 1 - e**2 for k, e in errors.items()}, 1 - overall**2


def merge_into_models(models: dict[str, Any], adapters: list[Weighted]) -> int:
    """Add every adapter's scaled update to the weights of `models` (component -> module); returns modules changed.

    Raises AdapterError naming the first module that is missing, does not fit, or would become non-finite.
    """
    import torch

    from .formats.read import check_against

    for adapter in adapters:
        check_against(adapter.state, models, adapter.name)
    changed = 0
    with torch.no_grad():
        for (component, path), parts in _paths(adapters).items():
            module = dict(models[component].named_modules())[path]
            weight = module.weight
            update = sum(delta_weight(lora, tuple(weight.shape), scale) for lora, scale in parts)
            merged = weight.float() + update
            if not torch.isfinite(merged).all():
                raise AdapterError(f"{component} module {path}: the merged weight is not finite; check the scales")
            weight.copy_(merged.to(weight.dtype))
            changed += 1
    return changed
