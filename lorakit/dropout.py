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
  rescale what is kept, and neither does this. A module that was off in every micro-batch of an optimizer step
  gets no gradient at all, as in kohya (where it never ran), so the optimizer leaves it alone: no momentum step
  and no weight decay (`forget_idle_gradients`, called between the backward passes and the optimizer step).

Both are forward hooks on peft's `lora_A` / `lora_B` modules, active only while those are in training mode:
validation losses and samples drawn during training, and every loader afterwards, see the whole adapter. The
masks come from torch's global generator, whose state a checkpoint saves and gradient checkpointing replays,
so a resumed run and a recomputed forward pass draw the same masks. Unlike `lora.dropout` (peft's, on the
adapter's input) these leave the saved file an ordinary LoRA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
        self._modules: list[list[torch.nn.Parameter]] = []  # module dropout: each adapter's down and up weights
        self._index: dict[int, int] = {}  # id of an up projection -> its place in `_modules`
        self._kept: dict[int, torch.Tensor] = {}  # place -> whether it ran in a micro-batch since the last step
        for model in models:
            for layer in model.modules():
                downs, ups = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
                if not isinstance(downs, torch.nn.ModuleDict) or not isinstance(ups, torch.nn.ModuleDict):
                    continue
                self.layers += 1
                if neuron or rank:
                    self._handles += [down.register_forward_hook(self._drop_ranks) for down in downs.values()]
                if module:
                    for name, up in ups.items():
                        self._index[id(up)] = len(self._modules)
                        self._modules.append([*downs[name].parameters(), *up.parameters()])
                        self._handles.append(up.register_forward_hook(self._drop_module))

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
        kept = torch.rand((), device=output.device) >= self.module
        place = self._index[id(up)]
        # a recomputed forward pass (gradient checkpointing) replays the same draw, so or-ing it again changes nothing
        self._kept[place] = kept if place not in self._kept else self._kept[place] | kept
        return output * kept.to(output.dtype)

    def forget_idle_gradients(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
        """Module dropout, after the step's backward passes: drop the gradients of every module that was switched off
        in all of them, so that the optimizer skips it as kohya's would; returns how many. `reduce` sums a tensor
        over the processes (a module counts as used when any process used it, since their gradients are
        averaged). One host sync per optimizer step."""
        if not self.module:
            return 0
        device = next(iter(self._kept.values())).device if self._kept else torch.device("cpu")
        used = torch.stack(
            [self._kept.get(i, torch.zeros((), dtype=torch.bool, device=device)) for i in range(len(self._modules))]
        ).to(torch.float32)
        self._kept = {}
        if reduce is not None:
            used = reduce(used)
        idle = [i for i, count in enumerate(used.tolist()) if not count]
        for i in idle:
            for parameter in self._modules[i]:
                parameter.grad = None
        return len(idle)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
