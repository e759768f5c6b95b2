"""Reading adapter files (kohya or diffusers layout) back into a `LoraState` for known module paths.

kohya names replace every "." with "_", which cannot be undone from the name alone, so reading is
driven by the model: the caller gives the module paths that exist, and every key in the file must
belong to one of them. Alpha is read per module (`.alpha`, or rank when absent) and returned
unfolded; nothing is handed to diffusers, whose kohya loader drops per-module alphas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterError
from . import exported_path
from .kohya import kohya_name

if TYPE_CHECKING:
    from ..adapters import LoraModule, LoraState

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_DIFFUSERS_SPELLINGS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)


def read_safetensors(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Tensors and header metadata of an adapter file; pickle formats are refused."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterError(
            f"{path}: {path.suffix} files are pickles, which can run code when loaded; "
            "convert it to .safetensors first"
        )
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{path}: not a readable .safetensors file ({err})") from None


def _module(down, up, alpha: float) -> LoraModule:
    from ..adapters import LoraModule

    return LoraModule(down=down.float(), up=up.float(), alpha=float(alpha))


def _check_shapes(path: Path, key: str, down, up) -> None:
    if down.shape[0] != up.shape[1]:
        raise AdapterError(f"{path}: {key}: down has rank {down.shape[0]} but up has {up.shape[1]}")


def read_adapter(path: str | Path, modules: dict[str, list[str]], *, sdxl: bool = False) -> LoraState:
    """The LoraState of an adapter file, for `modules` (component -> module paths of the model).

    Raises AdapterError naming the first key that belongs to no module of the model.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in tensors):
        return _read_kohya(path, tensors, modules, sdxl)
    return _read_diffusers(path, tensors, metadata, modules)


def _read_kohya(path: Path, tensors: dict, modules: dict[str, list[str]], sdxl: bool) -> LoraState:
    stems = {kohya_name(c, p, sdxl=sdxl): (c, p) for c, paths in modules.items() for p in paths}
    state: LoraState = {}
    for key in sorted(tensors):
        stem = key.split(".", 1)[0]
        if stem not in stems:
            raise AdapterError(
                f"{path}: {key} matches no adapted module of this model (another architecture or "
                "other target_modules?)"
            )
        if not key.endswith(".lora_down.weight"):
            continue
        up_key = f"{stem}.lora_up.weight"
        if up_key not in tensors:
            raise AdapterError(f"{path}: {key} has no matching {up_key}")
        down, up = tensors[key], tensors[up_key]
        _check_shapes(path, key, down, up)
        alpha = tensors[f"{stem}.alpha"].item() if f"{stem}.alpha" in tensors else down.shape[0]
        component, module_path = stems[stem]
        state.setdefault(component, {})[module_path] = _module(down, up, alpha)
    return state


def _read_diffusers(path: Path, tensors: dict, metadata: dict[str, str], modules: dict[str, list[str]]) -> LoraState:
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    names = {f"{c}.{exported_path(c, p)}": (c, p) for c, paths in modules.items() for p in paths}
    state: LoraState = {}
    for key in sorted(tensors):
        spelling = next((s for s in _DIFFUSERS_SPELLINGS if key.endswith(s)), None)
        stem = key[: -len(spelling[0] if key.endswith(spelling[0]) else spelling[1])] if spelling else None
        if stem not in names:
            raise AdapterError(
                f"{path}: {key} matches no adapted module of this model (another architecture or "
                "other target_modules?)"
            )
        if not key.endswith(spelling[0]):
            continue
        down, up = tensors[key], tensors[stem + spelling[1]]
        _check_shapes(path, key, down, up)
        component, module_path = names[stem]
        rank = config.get(f"{component}.rank_pattern", {}).get(
            module_path, config.get(f"{component}.r", down.shape[0])
        )
        alpha = config.get(f"{component}.alpha_pattern", {}).get(
            module_path, config.get(f"{component}.lora_alpha", rank)
        )
        state.setdefault(component, {})[module_path] = _module(down, up, alpha * down.shape[0] / rank)
    return state
