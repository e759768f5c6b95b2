"""Adapters written into the weights they change: what `merge --base` does to a base model, and what a recipe's
`model.merged_adapters` does to the frozen base before training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapters import LoraModule, adapted_weight, module_at
from .errors import AdapterError
from .formats.read import FAMILY_NAMES, check_against, read_adapter_file

if TYPE_CHECKING:
    from .adapters import LoraState


@dataclass
class Weighted:
    """An adapter state and the strength it is applied at."""

    state: LoraState
    scale: float
    name: str


def adapter_parts(adapters: list[Weighted]) -> dict[tuple[str, str], list[tuple[LoraModule, float]]]:
    """Each module the adapters change, with every adapter's module and scale there."""
    modules: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for adapter in adapters:
        for component, entries in adapter.state.items():
            for path, lora in entries.items():
                modules.setdefault((component, path), []).append((lora, adapter.scale))
    return modules


def merge_into_models(models: dict[str, Any], adapters: list[Weighted]) -> int:
    """Add every adapter's scaled update to the weights of `models` (component -> module); returns modules changed.

    Several adapters on one module add up as they do in peft: each DoRA adapter is normalised against the base
    weight alone.

    Raises AdapterError naming the first module that is missing, does not fit, or would become non-finite.
    """

    for adapter in adapters:
        check_against(adapter.state, models, adapter.name)
    changed = 0
    with torch.no_grad():
        for (component, path), parts in adapter_parts(adapters).items():
            module = module_at(dict(models[component].named_modules()), path)
            weight = module.weight
            merged = adapted_weight(weight, parts)
            if not torch.isfinite(merged).all():
                raise AdapterError(f"{component} module {path}: the merged weight is not finite; check the scales")
            weight.copy_(merged.to(weight.dtype))
            changed += 1
    return changed


def path_and_scale(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); the scale defaults to 1."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def merge_files(entries: list[str], models: dict[str, Any], family: str, what: str) -> str:
    """Merge adapter files (`path[:scale]` each) into `models` of a `family` base; returns what was merged, said
    in words. AdapterError names `what` (the recipe key or option) and the file that does not fit."""
    weighted = []
    for entry in entries:
        path, scale = path_and_scale(entry)
        try:
            adapter = read_adapter_file(path)
        except AdapterError as err:
            raise AdapterError(f"{what}: {err}") from None
        if adapter.family not in ("unknown", family):
            raise AdapterError(
                f"{what}: {path} is an {FAMILY_NAMES[adapter.family]} adapter but the base is an "
                f"{FAMILY_NAMES[family]} model; merge adapters trained on the same architecture"
            )
        weighted.append(Weighted(adapter.state, scale, f"{what}: {path}"))
    changed = merge_into_models(models, weighted)
    names = ", ".join(f"{Path(path).name} x{scale:g}" for path, scale in map(path_and_scale, entries))
    return f"{names} merged into the base ({changed} modules)"
