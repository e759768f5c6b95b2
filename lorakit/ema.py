"""Exponential moving average of the adapter weights."""

from __future__ import annotations

from typing import Any

import torch


class AdapterEMA:
    """A float32 shadow copy of each trainable tensor, updated after every optimizer step.

    The decay warms up as min(decay, (1 + step) / (10 + step)), the schedule diffusers' EMAModel
    uses, so that the average is not dominated by the untrained initial weights early on.
    """

    def __init__(self, named_params: dict[str, Any], decay: float):
        self.decay = decay
        self.params = named_params
        self.shadow = {name: p.detach().float().clone() for name, p in named_params.items()}

    def update(self, step: int) -> None:

        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, param in self.params.items():
                self.shadow[name].lerp_(param.detach().float(), 1 - decay)

    def load(self, tensors: dict[str, Any]) -> None:
        for name, tensor in tensors.items():
            self.shadow[name].copy_(tensor)
