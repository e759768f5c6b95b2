"""Frozen base weights stored in float8 (`model.weight_dtype = "float8"`; kohya's `fp8_base`, OneTrainer's float8
weight dtype): the U-Net's and text encoders' Linear and Conv2d weights take one byte per value, half of float16.

Each weight is stored as float8 e4m3 (3 mantissa bits, largest value 448) with one float32 scale per output
channel: the channel's largest magnitude maps to 448. An unscaled cast (kohya's) flushes every magnitude under
2^-9 to zero and keeps fewer bits for a channel of small weights; a per-channel scale keeps each channel's
relative precision whatever its range.

A stored layer computes in its compute dtype (the autocast dtype when autocast is on, else the dtype the rest of
the model is in): each forward pass dequantizes its weight for one matmul or convolution and frees it again. The
autograd graph keeps only the float8 weight and its scale, and the backward pass dequantizes once more for the
input's gradient (the weight is frozen: it has none of its own). So no higher-precision copy of the model is
ever held, with or without gradient checkpointing.

The U-Net's first and last convolutions (`conv_in`, `conv_out`: a few thousand weights that touch the latents
directly) keep the compute dtype; norms, biases and embeddings are not Linear or Conv2d weights and keep it too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448
KEPT_IN_UNET = ("conv_in", "conv_out")


def _stored(name: str, module: nn.Module, kept: tuple[str, ...]) -> bool:
    """Whether `module` (called `name` in its model) is a frozen Linear or zero-padded Conv2d that float8 stores."""
    if name.split(".")[0] in kept:
        return False
    if type(module) is nn.Linear:
        return not module.weight.requires_grad
    if type(module) is nn.Conv2d:
        plain = module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return plain and not module.weight.requires_grad
    return False


def stored_layers(model: nn.Module, kept: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """The layers of `model` whose weights float8 stores, by name (meta-device models too)."""
    return [(name, module) for name, module in model.named_modules() if _stored(name, module, kept)]


def stored_bytes(model: nn.Module, compute_bytes: int, kept: tuple[str, ...] = ()) -> int:
    """Bytes of `model`'s parameters and buffers once float8 stores what it stores: one byte per stored weight and a
    float32 scale per output channel, the rest at `compute_bytes` each. Counts shapes only (meta models too)."""
    layers = stored_layers(model, kept)
    stored = {id(module.weight) for _, module in layers}
    total = sum(module.weight.numel() + 4 * module.weight.shape[0] for _, module in layers)
    rest = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in stored]
    return total + sum(t.numel() for t in rest) * compute_bytes


def largest_weight(model: nn.Module, kept: tuple[str, ...] = ()) -> int:
    """Values in the largest weight float8 stores: the one dequantized copy alive at a time."""
    return max((module.weight.numel() for _, module in stored_layers(model, kept)), default=0)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values, float32 scale per output channel) of `weight`; dequantize(*quantize(w)) is close to w."""
    full = weight.detach().float()
    largest = full.abs().amax(dim=tuple(range(1, full.dim())))
    scale = largest.clamp_min(torch.finfo(torch.float32).tiny) / FLOAT8_MAX
    return (full / _per_channel(scale, full)).to(FLOAT8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype) * _per_channel(scale.to(dtype), values)


def _per_channel(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.view(-1, *[1] * (like.dim() - 1))


def _compute_dtype(x: torch.Tensor, own: torch.dtype) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else own


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, values, scale, bias, dtype):  # type: ignore[override]
        ctx.save_for_backward(values, scale)
        ctx.dtype, ctx.input_dtype = dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            bias = None if bias is None else bias.to(dtype)
            return F.linear(x.to(dtype), dequantize(values, scale, dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        values, scale = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = grad.to(ctx.dtype) @ dequantize(values, scale, ctx.dtype)
        return grad_x.to(ctx.input_dtype), None, None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, values, scale, bias, dtype, layout):  # type: ignore[override]
        ctx.save_for_backward(values, scale)
        ctx.dtype, ctx.input_dtype, ctx.input_shape, ctx.layout = dtype, x.dtype, x.shape, layout
        with torch.autocast(x.device.type, enabled=False):
            bias = None if bias is None else bias.to(dtype)
            return F.conv2d(x.to(dtype), dequantize(values, scale, dtype), bias, *layout)

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        values, scale = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            weight = dequantize(values, scale, ctx.dtype)
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad.to(ctx.dtype), *ctx.layout)
        return grad_x.to(ctx.input_dtype), None, None, None, None, None


class Float8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is float8 with a scale per output row (made by `store_in_float8`)."""

    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Linear.apply(x, self.weight, self.weight_scale, self.bias, _compute_dtype(x, self.compute_dtype))


class Float8Conv2d(nn.Conv2d):
    """A frozen nn.Conv2d whose weight is float8 with a scale per output channel (made by `store_in_float8`)."""

    weight_scale: torch.Tensor
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = (self.stride, self.padding, self.dilation, self.groups)
        dtype = _compute_dtype(x, self.compute_dtype)
        return _Conv2d.apply(x, self.weight, self.weight_scale, self.bias, dtype, layout)


def store_in_float8(model: nn.Module, compute_dtype: torch.dtype, kept: tuple[str, ...] = ()) -> tuple[int, int]:
    """Store the frozen Linear and Conv2d weights of `model` in float8, in place (after the adapters are added, so
    their own weights are not touched). Returns (layers stored, bytes saved against `compute_dtype`)."""
    layers = stored_layers(model, kept)
    saved = 0
    for _, module in layers:
        values, scale = quantize(module.weight)
        size = module.weight.numel()
        module.weight = nn.Parameter(values, requires_grad=False)
        module.register_buffer("weight_scale", scale)
        module.compute_dtype = compute_dtype
        module.__class__ = Float8Linear if type(module) is nn.Linear else Float8Conv2d
        saved += size * (torch.empty((), dtype=compute_dtype).element_size() - 1) - 4 * scale.numel()
    return len(layers), saved


def float8_names(model: nn.Module) -> list[str]:
    """The fully qualified names of the float8 weights and their scales in `model`: every process makes the same
    ones from the same base, so distributed training need not broadcast them (and gloo cannot)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (Float8Linear, Float8Conv2d)):
            prefix = f"{name}." if name else ""
            names += [f"{prefix}weight", f"{prefix}weight_scale"]
    return names
