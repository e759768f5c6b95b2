"""LoKr and LoHa (the LyCORIS adapter types): peft's configs for training, and the modules as the webuis read them.

Training goes through peft's own `LoKrConfig` / `LoHaConfig`; this module names the tensors, computes each
module's weight change the way the webuis do, and converts between the two scale conventions:

- peft scales every LoKr/LoHa module by `alpha / r`.
- LyCORIS files (and A1111/Forge's `network_lokr.py` / `network_hada.py`, ComfyUI's `weight_adapter/lokr.py` /
  `loha.py`) scale by `alpha / dim`, where `dim` is the inner size of a decomposed factor (`w1_b`/`w2_b`
  rows); a LoKr module whose two Kronecker factors are both stored whole has no `dim` and is applied at scale 1.

So on export a module's peft scale is written as `alpha = scale * dim`, or, for a LoKr module with both
factors whole, multiplied into `lokr_w1`. The arithmetic below restates those loaders' formulas (LoKr:
`kron(w1, w2)`, a Tucker core `t2` contracted as `t2 x1 w2_a x2 w2_b`; LoHa: the elementwise product of two
low-rank products) and is tested against peft's own layers and against the `lycoris-lora` package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KINDS = ("lokr", "loha")
TENSOR_NAMES = {
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
}
KIND_NAMES = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa"}

# Key suffixes of the LyCORIS algorithms lorakit does not read, and what they are.
OTHER_ALGORITHMS = (
    ("on_input", "IA3"),
    ("a1.weight", "GLoRA"),
    ("b1.weight", "GLoRA"),
    ("oft_blocks", "OFT/BOFT"),
    ("oft_diag", "OFT"),
    ("rescale", "OFT/BOFT"),
    ("diff", "full (diff)"),
    ("diff_b", "full (diff)"),
    ("w_norm", "norm"),
    ("b_norm", "norm"),
    ("lora_mid.weight", "LoCon with a Tucker core (lora_mid)"),
    ("dora_scale", "DoRA (dora_scale)"),
    ("scalar", "scalar-scaled LyCORIS"),
)


def other_algorithm(suffix: str) -> str | None:
    """The LyCORIS algorithm a key suffix belongs to, when it is one lorakit does not read."""
    return next((name for key, name in OTHER_ALGORITHMS if suffix == key), None)


@dataclass
class LycorisModule:
    """One LoKr or LoHa module in the LyCORIS convention: `tensors` by LyCORIS name, `alpha` as the file stores it,
    `shape` the full weight shape of the module it changes."""

    kind: str  # "lokr" or "loha"
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    shape: tuple[int, ...]

    @property
    def dim(self) -> int | None:
        """The inner size that `alpha` is divided by; None for a LoKr module with both factors whole (scale 1)."""
        t = self.tensors
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if "lokr_w2_b" in t:  # with both factors decomposed, the webuis take w2_b's (peft's r for both)
            return t["lokr_w2_b"].shape[0]
        if "lokr_w1_b" in t:
            return t["lokr_w1_b"].shape[0]
        return None

    @property
    def rank(self) -> int:
        """The rank reported to people (LyCORIS' `network_dim`): `dim`, or 1 for whole factors."""
        return self.dim or 1

    @property
    def scale(self) -> float:
        if self.dim is None or self.alpha is None:
            return 1.0
        return self.alpha / self.dim

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """The weight change at `scale`, float32, in the module's weight shape."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            change = torch.kron(w1, w2.contiguous())
        else:
            if "hada_t1" in t:
                w1 = tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
                w2 = tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
            else:
                w1, w2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
            change = w1 * w2
        return change.reshape(self.shape) * (self.scale * scale)


def tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A conv kernel from a Tucker core [r, r, kh, kw] and its mode factors out [r, out] and in [r, in]."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, out_factor, in_factor)


def peft_config(kind: str, **options):
    """peft's LoKrConfig / LoHaConfig for `kind` (options are the config's own field names)."""
    from peft import LoHaConfig, LoKrConfig

    config_class = LoKrConfig if kind == "lokr" else LoHaConfig
    if kind == "loha":
        options.pop("decompose_both", None)
        options.pop("decompose_factor", None)
    return config_class(init_weights=True, **options)


def is_parameter(name: str) -> bool:
    """Whether a parameter name is one of peft's LoKr/LoHa factors."""
    return re.search(r"\.(lokr|hada)_[a-z0-9_]+\.", name) is not None


def extract(model: torch.nn.Module, adapter: str, weights: dict[str, torch.Tensor]) -> dict[str, LycorisModule]:
    """The LoKr/LoHa modules of a peft-adapted `model`, in the LyCORIS convention (see the module docstring).

    `weights` (parameter name -> tensor, e.g. an EMA) replaces the live parameters where given.
    """
    modules = {}
    for name, module in model.named_modules():
        kind = _kind_of(module, adapter)
        if kind is None:
            continue
        tensors = {}
        for tensor_name in TENSOR_NAMES[kind]:
            store = getattr(module, tensor_name, {})
            if adapter in store:
                key = f"{name}.{tensor_name}.{adapter}"
                tensors[tensor_name] = weights.get(key, store[adapter]).detach().float()
        shape = tuple(module.get_base_layer().weight.shape)
        found = LycorisModule(kind, tensors, None, shape)
        scaling = float(module.scaling[adapter])
        if found.dim is None:  # LoKr with both factors whole: the webuis apply it at scale 1
            tensors["lokr_w1"] = tensors["lokr_w1"] * scaling
        else:
            found.alpha = scaling * found.dim
        modules[name] = found
    return modules


def _kind_of(module: torch.nn.Module, adapter: str) -> str | None:
    """ "lokr" or "loha" for a peft LoKr/LoHa layer holding `adapter` (its tensor stores exist either way)."""
    if adapter in getattr(module, "hada_w1_a", {}):
        return "loha"
    if adapter in getattr(module, "lokr_w1", {}) or adapter in getattr(module, "lokr_w1_a", {}):
        return "lokr"
    return None


def full_shape(kind: str, tensors: dict[str, torch.Tensor], kernel: tuple[int, int] | None) -> tuple[int, ...]:
    """The weight shape a module's factors rebuild. Factors stored flat ([r, in * kh * kw]) do not say the kernel
    size: `kernel` (from the module's name, see `formats.read`) does; None means a Linear module."""
    t = tensors
    if kind == "loha":
        if "hada_t1" in t:
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
        out, flat = t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]
    else:
        w1 = tuple(t["lokr_w1"].shape) if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_t2" in t:
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
        elif "lokr_w2" in t:
            w2 = tuple(t["lokr_w2"].shape)
        else:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
        if len(w2) == 4:
            return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        out, flat = w1[0] * w2[0], w1[1] * w2[1]
    if kernel is None:
        return (out, flat)
    area = kernel[0] * kernel[1]
    if flat % area:
        raise ValueError(f"{flat} input values do not split into {kernel[0]}x{kernel[1]} kernels")
    return (out, flat // area, *kernel)
