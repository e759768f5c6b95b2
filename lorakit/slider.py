"""Concept sliders (Gandikota et al. 2023, arXiv:2311.12092; ai-toolkit's slider training): a LoRA learned from
prompts alone, whose strength moves one concept along a direction, with 0 the base itself.

Each step makes a noisy latent the way the base makes pictures: pure noise, denoised by the frozen base under
`target_class` for a random number k of `denoise_steps` steps (1 <= k <= denoise_steps - 2), with guidance 3, as
ai-toolkit does. At the timestep t where it stopped, the frozen base predicts for three prompts, and the direction
d = eta x (prediction(positive) - prediction(negative)) is added to or taken from its prediction for
`target_class`:

    strength +1:  prediction(target_class) + d
    strength -1:  prediction(target_class) - d

The adapter learns both targets in one forward pass of twice the batch: the first half at strength +1, the second
at -1 (`SampleStrengths`: forward hooks on peft's LoRA up projections that multiply each sample's adapter output by its
strength). Each layer's change is linear in the strength, so a slider trained at +-1 draws in between at any
strength, and further out at 2 or 3. The reference is the prediction for `target_class`, as in the paper,
so strength 0 is exactly the base; ai-toolkit takes the empty prompt's prediction there (the same when
`target_class` is empty).

The file is an ordinary LoRA: every loader applies it at a negative strength by scaling it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch

STARTING_GUIDANCE = 3.0  # the guidance of the base's denoising that makes each step's noisy latent (ai-toolkit's)
SIDES = (1.0, -1.0)  # the strengths a slider is trained at: the first half of the batch at +1, the second at -1


class SampleStrengths:
    """A strength per sample for every peft LoRA layer of `models`: while `set`, the output of each LoRA up
    projection (`lora_B`) is multiplied by its sample's strength; `clear()` (the default) leaves it alone.

    The strengths stay set until cleared, so that gradient checkpointing, which runs a block's forward again during
    the backward pass, recomputes it at the same strengths."""

    def __init__(self, models: Iterable[torch.nn.Module]):
        self.values: torch.Tensor | None = None
        self._handles = []
        for model in models:
            for layer in model.modules():
                ups = getattr(layer, "lora_B", None)
                if isinstance(ups, torch.nn.ModuleDict):
                    self._handles += [up.register_forward_hook(self._scale) for up in ups.values()]
        if not self._handles:
            raise ValueError("no LoRA up projection to give a strength to")

    def set(self, values: torch.Tensor) -> None:
        self.values = values.detach()

    def clear(self) -> None:
        self.values = None

    def _scale(self, module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.values is None:
            return output
        if output.shape[0] != self.values.shape[0]:
            raise RuntimeError(f"slider strengths: {self.values.shape[0]} strengths for a batch of {output.shape[0]}")
        values = self.values.to(output.device, output.dtype)
        return output * values.reshape(-1, *[1] * (output.dim() - 1))


def shuffled(text: str, rng: random.Random) -> str:
    """A prompt's comma-separated parts in a random order (ai-toolkit's `shuffle`), joined as they were written."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    rng.shuffle(parts)
    return ", ".join(parts)


def sided_targets(
    neutral: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, guidance: float
) -> torch.Tensor:
    """What the adapter should predict at strengths +1 and -1, one after the other along the batch: the base's
    prediction for the target class moved by `guidance` x (positive - negative), and moved back by as much."""
    direction = guidance * (positive - negative)
    return torch.cat([neutral + direction, neutral - direction])


def partial_denoise(
    predict: Callable[[torch.Tensor, Any], torch.Tensor],
    scheduler: Any,
    latents: torch.Tensor,
    steps: int,
    taken: int,
) -> tuple[torch.Tensor, Any]:
    """`taken` of `steps` DDIM steps of classifier-free guided denoising from `latents` (pure noise). `predict(x,
    t)` returns the prediction for the batch doubled: unconditioned first, then conditioned. Returns the latents
    and the timestep they are now at."""
    if not 1 <= taken < steps:
        raise ValueError(f"{taken} of {steps} denoising steps: take 1 to {steps - 1}")
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    latents = latents * scheduler.init_noise_sigma
    for t in timesteps[:taken]:
        unconditioned, conditioned = predict(torch.cat([latents] * 2), t).float().chunk(2)
        guided = unconditioned + STARTING_GUIDANCE * (conditioned - unconditioned)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents, timesteps[taken]


class NoImages:
    """The batch stream of a run without images (a slider): each micro-batch is the next step of one endless
    epoch. It keeps the position a checkpoint records, as `data.BatchStream` does."""

    batches_per_epoch = 1
    epoch = 0
    epochs_done = 0.0

    def __init__(self, offset: int = 0):
        self.offset = offset

    def next(self) -> list[int]:
        self.offset += 1
        return []
