"""kohya's dropouts inside a LoRA (its `network_dropout` and the `rank_dropout` / `module_dropout` network args),
for peft's LoRA layers.

- **Neuron dropout** (`lora.neuron_dropout`, kohya's `network_dropout`): in each training forward pass, every
  value of a LoRA down projection's output is zeroed with probability p and the rest scaled by 1 / (1 - p)
  (peft's own `lora_dropout`, lorakit's `lora.dropout`, acts on the input instead).
- **Rank dropout** (`lora.rank_dropout`, kohya's `rank_dropout` network arg): in each training forward pass,
  every rank of a LoRA down projection's output is zeroed with probability p, independently per sample, and the
  kept ones are scaled by 1 / (1 - p), so the update's expected size stays the same. No single rank can carry
  the subject alone.
- **Module dropout** (`lora.module_dropout`, kohya's `module_dropout`): in each training forward pass, a whole
  LoRA module is switched off with probability p (its layer computes the base weight alone). kohya does not
  rescale what is kept, and neither does this.

Both are forward hooks on peft's `lora_A` / `lora_B` modules, active only while those are in training mode:
validation losses and samples drawn during training, and every loader afterwards, see the whole adapter. The
masks come from torch's global generator, whose state a checkpoint saves and gradient checkpointing replays,
so a resumed run and a recomputed forward pass draw the same masks. Unlike `lora.dropout` (peft's, on the
adapter's input) these leave the saved file an ordinary LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class AdapterDropout:
    """Neuron, rank and module dropout hooks on every peft LoRA layer of `models`; `remove()` takes them out again."""

    def __init__(
        self, models: Iterable[torch.nn.Module], *, neuron: float = 0.0, rank: float = 0.0, module: float = 0.0
    ):
        if not all(0 <= p < 1 for p in (neuron, rank, module)):
            raise ValueError(f"dropout probabilities must be in [0, 1), got {neuron}, {rank}, {module}")
        self.neuron, self.rank, self.module = neuron, rank, module
        self._handles: list[Any] = []
        self.layers = 0
        for model in models:
            for layer in model.modules():
                downs, ups = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
                if not isinstance(downs, torch.nn.ModuleDict) or not isinstance(ups, torch.nn.ModuleDict):
                    continue
                self.layers += 1
                if neuron or rank:
                    self._handles += [down.register_forward_hook(self._drop_ranks) for down in downs.values()]
                if module:
                    self._handles += [up.register_forward_hook(self._drop_module) for up in ups.values()]

    def _drop_ranks(self, down: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not down.training:
            return output
        if self.neuron:
            output = torch.nn.functional.dropout(output, self.neuron)
        if not self.rank:
            return output
        channel = 1 if isinstance(down, torch.nn.Conv2d) else output.dim() - 1
        batch = output.shape[0] if output.dim() > 1 else 1
        keep = torch.rand(batch, output.shape[channel], device=output.device) >= self.rank
        shape = [batch] + [1] * (output.dim() - 1)
        shape[channel] = output.shape[channel]
        if output.dim() == 1:  # an unbatched call: the ranks alone
            shape = [output.shape[0]]
        return output * (keep.to(output.dtype) / (1 - self.rank)).reshape(shape)

    def _drop_module(self, up: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not up.training:
            return output
        # A tensor comparison, not a Python branch: no host sync on a GPU.
        return output * (torch.rand((), device=output.device) >= self.module).to(output.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
