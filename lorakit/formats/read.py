"""Reading adapter files (kohya or diffusers layout) into a `LoraState`, with no model needed.

kohya names replace every "." of a module path with "_"; the path is recovered with the grammar of
diffusers' U-Net and CLIP module names (`down_blocks`, `to_out`, `self_attn` ... are single
names). Alphas are read per module (`.alpha`, or the rank when absent) and kept unfolded, so
callers can fold `alpha / rank` into the up weights before anything reaches diffusers, whose kohya
loader drops per-module alphas. Text-encoder paths are returned as transformers 5 spells them
(without `text_model.`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from ..adapters import LoraModule, module_at
from ..errors import AdapterError, first_line
from ..lycoris import KIND_NAMES, KINDS, TENSOR_NAMES, LycorisModule, full_shape, other_algorithm
from .kohya import sdxl_diffusers_path

if TYPE_CHECKING:
    from ..adapters import LoraModule, LoraState

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "unknown"}
_DIFFUSERS_SPELLINGS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
_KOHYA_PREFIXES = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
# Module names that contain "_" themselves; everything else in a kohya stem splits at "_".
_COMPOUND = {
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "conv_shortcut",
    "time_emb_proj",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "final_layer_norm",
    "add_embedding",
    "text_projection",
    "conv_act",
    # SDXL's original block names (kohya SDXL files)
    "input_blocks",
    "middle_block",
    "output_blocks",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
}


@dataclass
class AdapterFile:
    """An adapter file read into lorakit's representation."""

    path: Path
    layout: str  # "kohya" or "diffusers"
    state: LoraState
    metadata: dict[str, str]

    @property
    def family(self) -> str:
        return guess_family(self.state, self.metadata)


def kohya_stem_to_path(stem: str) -> tuple[str, str]:
    """(component, module path) of a kohya key stem such as `lora_te_text_model_encoder_layers_0_mlp_fc1`."""
    prefix = next((p for p in sorted(_KOHYA_PREFIXES, key=len, reverse=True) if stem.startswith(p + "_")), None)
    if prefix is None:
        raise ValueError(stem)
    tokens, parts = stem[len(prefix) + 1 :].split("_"), []
    while tokens:
        for width in (3, 2, 1):
            candidate = "_".join(tokens[:width])
            if width == 1 or candidate in _COMPOUND:
                parts.append(candidate)
                tokens = tokens[width:]
                break
    component = _KOHYA_PREFIXES[prefix]
    path = ".".join(parts)
    if component.startswith("text_encoder") and path.startswith("text_model."):
        path = path[len("text_model.") :]
    if component == "unet" and path.startswith(("input_blocks.", "middle_block.", "output_blocks.")):
        path = sdxl_diffusers_path(path)  # an SDXL file: original block names
    return component, path


def _load_tensors(path: Path, allow_pickle: bool) -> tuple[dict, dict[str, str]]:

    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise AdapterError(
                f"{path}: {path.suffix} files are pickles, which can run code when loaded; convert "
                "it to .safetensors, or pass --allow-pickle to load its tensors only"
            )
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses anything but tensors and plain containers
            raise AdapterError(f"{path}: cannot load as plain tensors ({type(err).__name__}: {err})") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterError(f"{path}: not a dictionary of tensors")
        return data, {}
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{path}: not a readable .safetensors file ({err})") from None


def _module(down, up, alpha: float) -> LoraModule:

    return LoraModule(down=down.float(), up=up.float(), alpha=float(alpha))


def _check_pair(path: Path, key: str, down, up) -> None:

    for name, tensor in (("down", down), ("up", up)):
        if tensor.dim() not in (2, 4):
            raise AdapterError(
                f"{path}: {key}: the {name} weight has shape {tuple(tensor.shape)}; LoRA weights are 2-D (linear) "
                "or 4-D (convolution); the file is damaged"
            )
    if down.shape[0] == 0:
        raise AdapterError(f"{path}: {key}: rank 0 (no weights); the file is damaged")
    if down.shape[0] != up.shape[1]:
        raise AdapterError(f"{path}: {key}: down has rank {down.shape[0]} but its up weight has {up.shape[1]}")
    for tensor in (down, up):
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: {key}: holds NaN or infinite values; the file is damaged")


def read_adapter_file(path: str | Path, *, allow_pickle: bool = False) -> AdapterFile:
    """Read a kohya- or diffusers-layout adapter file; AdapterError names the first unusable key."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    tensors, metadata = _load_tensors(path, allow_pickle)
    if not tensors:
        raise AdapterError(f"{path}: holds no tensors")
    try:
        if any(k.startswith(tuple(p + "_" for p in _KOHYA_PREFIXES)) for k in tensors):
            adapter = AdapterFile(path, "kohya", _read_kohya(path, tensors), metadata)
            if adapter.family == "sd1":
                _pointwise_proj(adapter.state)
            return adapter
        return AdapterFile(path, "diffusers", _read_diffusers(path, tensors, metadata), metadata)
    except AdapterError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as err:
        # what the checks above do not name: tensors whose shapes contradict each other, odd metadata values
        raise AdapterError(f"{path}: not a usable adapter ({type(err).__name__}: {first_line(err)[:200]})") from None


def _read_kohya(path: Path, tensors: dict) -> LoraState:
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        stem, _, suffix = key.partition(".")
        stems.setdefault(stem, {})[suffix] = tensors[key]
    state: LoraState = {}
    for stem, parts in stems.items():
        for suffix in parts:
            algorithm = other_algorithm(suffix)
            if algorithm is not None:
                raise AdapterError(
                    f"{path}: {stem}.{suffix}: a LyCORIS {algorithm} module; lorakit reads LoRA, LoKr and LoHa"
                )
        try:
            component, module_path = kohya_stem_to_path(stem)
        except ValueError:
            raise AdapterError(
                f"{path}: {stem}: unknown prefix; kohya keys start with lora_unet_, lora_te_, lora_te1_ or lora_te2_"
            ) from None
        kind = next((k for k in KINDS if any(s in TENSOR_NAMES[k] for s in parts)), None)
        if kind is not None:
            module = _lycoris_module(path, stem, kind, parts, module_path)
        else:
            module = _lora_module(path, stem, parts)
        state.setdefault(component, {})[module_path] = module
    return state


def _lora_module(path: Path, stem: str, parts: dict[str, torch.Tensor]) -> LoraModule:
    for suffix in parts:
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise AdapterError(
                f"{path}: {stem}.{suffix}: not a LoRA, LoKr or LoHa key (expected .lora_down.weight, .lora_up.weight, "
                ".alpha, or LyCORIS' lokr_* / hada_* names)"
            )
    for needed in ("lora_down.weight", "lora_up.weight"):
        if needed not in parts:
            present = next(iter(parts))
            raise AdapterError(f"{path}: {stem}.{present} has no matching {stem}.{needed}")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    _check_pair(path, f"{stem}.lora_down.weight", down, up)
    return _module(down, up, _alpha(path, stem, parts, down.shape[0]))


def _alpha(path: Path, stem: str, parts: dict[str, torch.Tensor], default: float | None) -> float | None:
    if "alpha" in parts and parts["alpha"].numel() != 1:
        raise AdapterError(
            f"{path}: {stem}.alpha holds {parts['alpha'].numel()} values; an alpha is one number; the file is damaged"
        )
    if "alpha" not in parts:
        return default
    alpha = parts["alpha"].float().item()
    if not math.isfinite(alpha):
        raise AdapterError(f"{path}: {stem}.alpha is {alpha}; the file is damaged")
    return alpha


# The kernel of U-Net convolutions whose LoKr/LoHa factors are stored flat ([r, in * kh * kw]), by module name.
_KERNELS = {"conv1": (3, 3), "conv2": (3, 3), "conv": (3, 3), "conv_in": (3, 3), "conv_out": (3, 3)}
_POINTWISE = ("conv_shortcut",)  # 1x1 convolutions; SD 1.x's proj_in / proj_out too (see `_pointwise_proj`)


def _lycoris_module(path: Path, stem: str, kind: str, parts: dict, module_path: str) -> LycorisModule:
    names = TENSOR_NAMES[kind]
    unknown = [s for s in parts if s not in names and s != "alpha"]
    if unknown:
        raise AdapterError(f"{path}: {stem}.{unknown[0]}: not a {KIND_NAMES[kind]} key (expected {', '.join(names)})")
    factors = {name: parts[name].float() for name in names if name in parts}
    missing = _missing_factors(kind, factors)
    if missing:
        raise AdapterError(f"{path}: {stem}: a {KIND_NAMES[kind]} module without {' and '.join(missing)}")
    for name, tensor in factors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: {stem}.{name}: holds NaN or infinite values; the file is damaged")
    last = module_path.rsplit(".", 1)[-1]
    kernel = _KERNELS.get(last) or ((1, 1) if last in _POINTWISE else None)
    try:
        shape = full_shape(kind, factors, kernel)
        module = LycorisModule(kind, factors, _alpha(path, stem, parts, None), shape)
        module.delta()  # the factors fit together
    except (KeyError, ValueError, RuntimeError) as err:
        raise AdapterError(f"{path}: {stem}: the {KIND_NAMES[kind]} factors do not fit together ({err})") from None
    return module


def _missing_factors(kind: str, factors: dict) -> list[str]:
    """The tensors a LoKr/LoHa module needs and lacks (each Kronecker factor whole or as an _a/_b pair)."""
    if kind == "loha":
        needed = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if "hada_t1" in factors or "hada_t2" in factors:
            needed += ["hada_t1", "hada_t2"]
        return [n for n in needed if n not in factors]
    missing = []
    for side in ("w1", "w2"):
        if f"lokr_{side}" not in factors:
            missing += [n for n in (f"lokr_{side}_a", f"lokr_{side}_b") if n not in factors]
    return missing


def _pointwise_proj(state: LoraState) -> None:
    """SD 1.x's transformer proj_in / proj_out are 1x1 convolutions (Linear from SD 2 on): give flat LoKr/LoHa
    factors there the conv shape."""
    for path, module in state.get("unet", {}).items():
        if isinstance(module, LycorisModule) and path.endswith(("proj_in", "proj_out")) and len(module.shape) == 2:
            module.shape = (*module.shape, 1, 1)


def _split_diffusers_key(key: str) -> tuple[str, str, int] | None:
    for down_suffix, up_suffix in _DIFFUSERS_SPELLINGS:
        for index, suffix in enumerate((down_suffix, up_suffix)):
            if key.endswith(suffix):
                return key[: -len(suffix)], (down_suffix, up_suffix)[1 - index], index
    return None


def _read_diffusers(path: Path, tensors: dict, metadata: dict[str, str]) -> LoraState:

    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise AdapterError(
            f"{path}: the lora_adapter_metadata header is not a JSON object; the file is damaged (or remove that "
            "header entry to read the tensors with default alphas)"
        )
    state: LoraState = {}
    magnitude_suffixes = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
    magnitudes = {
        key.partition(".lora_magnitude_vector")[0]: tensor
        for key, tensor in tensors.items()
        if key.endswith(magnitude_suffixes)
    }
    tensors = {key: tensor for key, tensor in tensors.items() if not key.endswith(magnitude_suffixes)}
    for key in sorted(tensors):
        split = _split_diffusers_key(key)
        component = key.split(".", 1)[0]
        if split is None or component not in ("unet", "text_encoder", "text_encoder_2"):
            raise AdapterError(
                f"{path}: {key}: not a LoRA key of the diffusers layout (expected unet./text_encoder. "
                "+ module + .lora_A.weight / .lora_B.weight)"
            )
        stem, partner_suffix, is_up = split
        partner = stem + partner_suffix
        if partner not in tensors:
            raise AdapterError(f"{path}: {key} has no matching {partner}")
        if is_up:
            continue
        down, up = tensors[key], tensors[partner]
        _check_pair(path, key, down, up)
        module_path = stem[len(component) + 1 :]
        if component.startswith("text_encoder") and module_path.startswith("text_model."):
            module_path = module_path[len("text_model.") :]
        rank = config.get(f"{component}.rank_pattern", {}).get(
            module_path, config.get(f"{component}.r", down.shape[0])
        )
        alpha = config.get(f"{component}.alpha_pattern", {}).get(
            module_path, config.get(f"{component}.lora_alpha", rank)
        )
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (rank, alpha)) or not (
            math.isfinite(alpha) and rank > 0
        ):
            raise AdapterError(
                f"{path}: lora_adapter_metadata gives {component} {module_path} rank {str(rank)[:20]} and alpha "
                f"{str(alpha)[:20]}; expected a positive rank and a finite alpha; the file is damaged"
            )
        lora = _module(down, up, alpha * down.shape[0] / rank)
        magnitude = magnitudes.pop(stem, None)
        if magnitude is not None:
            if magnitude.numel() != up.shape[0] or not torch.isfinite(magnitude).all():
                raise AdapterError(
                    f"{path}: {stem}.lora_magnitude_vector: expected {up.shape[0]} finite values (one per output "
                    f"row), found {magnitude.numel()}"
                )
            lora.magnitude = magnitude.float().reshape(-1)
        state.setdefault(component, {})[module_path] = lora
    if magnitudes:
        raise AdapterError(f"{path}: {next(iter(magnitudes))}.lora_magnitude_vector has no matching lora_A/lora_B")
    return state


def guess_family(state: LoraState, metadata: dict[str, str]) -> str:
    """ "sd1", "sd2", "sdxl" or "unknown", from metadata when present, else from names and widths."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    if version == "sd_v1":
        return "sd1"
    if "text_encoder_2" in state or any(
        p.startswith(("input_blocks", "output_blocks", "middle_block")) for p in state.get("unet", {})
    ):
        return "sdxl"
    widths = {m.shape[1] for path, m in state.get("text_encoder", {}).items() if path.endswith("q_proj")}
    # Without a text encoder, the U-Net's cross-attention keys show the text width.
    widths |= {m.shape[1] for path, m in state.get("unet", {}).items() if path.endswith("attn2.to_k")}
    return {frozenset({768}): "sd1", frozenset({1024}): "sd2", frozenset({2048}): "sdxl"}.get(
        frozenset(widths), "unknown"
    )


def check_against(state: LoraState, models: dict[str, Any], source: str) -> None:
    """Raise AdapterError naming the first module of `state` that `models` lack or whose shape differs."""
    for component, modules in state.items():
        model = models.get(component)
        if model is None:
            raise AdapterError(f"{source}: has {component} weights but this base model has no {component}")
        named = dict(model.named_modules())
        for path, lora in modules.items():
            module = module_at(named, path)
            module = getattr(module, "base_layer", module)
            if module is None or not hasattr(module, "weight"):
                raise AdapterError(
                    f"{source}: {component} module {path} does not exist in this base model; the "
                    "adapter is for another architecture"
                )
            weight = module.weight
            if isinstance(lora, LycorisModule):
                if lora.shape != tuple(weight.shape):
                    if math.prod(lora.shape) != weight.numel() or lora.shape[:2] != tuple(weight.shape[:2]):
                        raise AdapterError(
                            f"{source}: {component} module {path}: adapter shape {'x'.join(map(str, lora.shape))} "
                            f"does not fit the base weight {'x'.join(map(str, weight.shape))}; the adapter is for "
                            "another architecture"
                        )
                    lora.shape = tuple(weight.shape)  # flat factors: the base says the kernel
                continue
            if (lora.up.shape[0], lora.down.shape[1], lora.down.ndim) != (
                weight.shape[0],
                weight.shape[1],
                weight.ndim,
            ):
                raise AdapterError(
                    f"{source}: {component} module {path}: adapter shape "
                    f"{lora.up.shape[0]}x{lora.down.shape[1]} does not fit the base weight "
                    f"{weight.shape[0]}x{weight.shape[1]}; the adapter is for another architecture"
                )


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def tensors_dtype(path: str | Path, prefix: str = "") -> str | None:
    """The floating dtype that most of the elements of a .safetensors file's tensors under `prefix` are stored in
    ("float32", "float16" or "bfloat16"), from its header alone; None for a file that cannot be read or has none."""
    return tensors_dtypes(path, prefix)[0]


def tensors_dtypes(path: str | Path, *prefixes: str) -> tuple[str | None, ...]:
    """`tensors_dtype` for each of `prefixes` ("" for the whole file), from one pass over the header."""
    elements: list[dict[str, int]] = [{} for _ in prefixes]
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                wanted = [counts for prefix, counts in zip(prefixes, elements, strict=True) if key.startswith(prefix)]
                tensor = f.get_slice(key) if wanted else None
                if tensor is not None and tensor.get_dtype() in _DTYPES:
                    name, size = _DTYPES[tensor.get_dtype()], math.prod(tensor.get_shape())
                    for counts in wanted:
                        counts[name] = counts.get(name, 0) + size
    except (SafetensorError, OSError):
        return (None,) * len(prefixes)
    return tuple(max(counts, key=counts.get) if counts else None for counts in elements)


def stored_dtype(adapter: AdapterFile) -> str:
    """The dtype the file stores its weights in (kept by convert)."""

    if adapter.path.suffix.lower() != ".safetensors":
        return "float32"
    return tensors_dtype(adapter.path) or "float32"
