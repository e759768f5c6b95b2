"""Timestep-dependent rank (T-LoRA, Soboleva et al., AAAI 2026): fewer of a LoRA's ranks act at noisier timesteps.

At diffusion timestep t of T, a U-Net adapter of rank R uses only its first

    r(t) = floor(((T - t) / T) ** exponent * (R - min_rank)) + min_rank

ranks: all R on an almost clean image (t = 0), `min_rank` on pure noise (t -> T). The high-noise steps decide
layout and background, and a few photos teach those most readily, so there the adapter has little capacity to
learn them; the low-noise steps, which draw the subject's details, get all of it.

The mask acts on the output of each LoRA down projection (peft's `lora_A`): the ranks beyond r(t) contribute
nothing to that sample's forward pass and get no gradient from it. A forward pre-hook on the U-Net reads the
timestep of each call (a [B] tensor in training, one value per denoising step at inference), so the same
`TimestepRanks` serves both. Text-encoder adapters never see a timestep and always use their full rank.

The saved factors are an ordinary LoRA: the mask is a device of the forward pass and leaves no trace in the
file, which every loader reads as it reads any LoRA. What such a loader draws, though, is the adapter at full rank
on every step, which is not the function it was trained as, and it shows: on the toy world (README, "New
contexts") the same file drawn at full rank lost its seen-context fidelity at guidance 7 (0.62 -> 0.00) and prior
accuracy (0.83 -> 0.71). So the file loads everywhere but draws as trained only under its schedule, which the
file's metadata records and `lorakit generate` applies.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import AdapterError
from .recipe import TIMESTEPS_MAX, range_problem

METADATA_MIN_RANK = "lorakit_tlora_min_rank"
METADATA_EXPONENT = "lorakit_tlora_exponent"
METADATA_TIMESTEPS = "lorakit_tlora_timesteps"


def active_ranks(
    timesteps: torch.Tensor, num_train_timesteps: int, rank: int, min_rank: int, exponent: float = 1.0
) -> torch.Tensor:
    """How many of `rank` ranks act at each timestep: an integer tensor shaped like `timesteps`."""
    low = min(min_rank, rank)
    remaining = ((num_train_timesteps - timesteps.double()) / num_train_timesteps).clamp(0, 1)
    return (remaining**exponent * (rank - low)).floor().long() + low


def schedule_from_metadata(metadata: dict[str, str], where: str) -> tuple[int, float, int] | None:
    """(min_rank, exponent, num_train_timesteps) when an adapter file records a T-LoRA schedule, else None."""
    if METADATA_MIN_RANK not in metadata:
        return None
    try:
        schedule = (
            int(metadata[METADATA_MIN_RANK]),
            float(metadata[METADATA_EXPONENT]),
            int(metadata.get(METADATA_TIMESTEPS, "1000")),
        )
    except (KeyError, ValueError):
        schedule = None
    # the recipe's own bounds, so every file lorakit writes passes
    if (
        schedule is None
        or range_problem("lora.tlora_min_rank", schedule[0])
        or range_problem("lora.tlora_exponent", schedule[1])
        or not 1 <= schedule[2] <= TIMESTEPS_MAX
    ):
        keys = f"{METADATA_MIN_RANK}, {METADATA_EXPONENT}, {METADATA_TIMESTEPS}"
        raise AdapterError(f"{where}: the T-LoRA schedule in its metadata ({keys}) is not valid")
    return schedule


class TimestepRanks:
    """Masks the ranks of every LoRA down projection in `unet` by the timestep of each U-Net call.

    `adapter_names` selects which of peft's adapters are masked (by default every one). `remove()` takes the
    hooks out again; the adapter's weights are never touched.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        min_rank: int,
        exponent: float,
        num_train_timesteps: int,
        adapter_names: tuple[str, ...] | None = None,
    ):
        self.min_rank, self.exponent, self.num_train_timesteps = min_rank, exponent, num_train_timesteps
        self._timesteps: torch.Tensor | None = None
        self._masks: dict[tuple[int, Any, Any], torch.Tensor] = {}
        self._handles = [unet.register_forward_pre_hook(self._read_timestep, with_kwargs=True)]
        self.modules = 0
        for module in unet.modules():
            downs = getattr(module, "lora_A", None)
            if not isinstance(downs, torch.nn.ModuleDict):
                continue
            for name, down in downs.items():
                if adapter_names is None or name in adapter_names:
                    self._handles.append(down.register_forward_hook(self._mask_ranks))
                    self.modules += 1
        if not self.modules:
            self.remove()
            raise ValueError("the U-Net has no LoRA adapter to mask by timestep")

    def _read_timestep(self, _module: Any, args: tuple, kwargs: dict) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        timestep = torch.as_tensor(timestep).detach()
        self._timesteps = timestep.reshape(-1) if timestep.dim() else timestep.reshape(1)
        self._masks.clear()

    def _mask(self, rank: int, device: Any, dtype: Any) -> torch.Tensor:
        key = (rank, device, dtype)
        if key not in self._masks:
            ranks = active_ranks(
                self._timesteps.to(device), self.num_train_timesteps, rank, self.min_rank, self.exponent
            )
            self._masks[key] = (torch.arange(rank, device=device) < ranks[:, None]).to(dtype)
        return self._masks[key]

    def _mask_ranks(self, module: Any, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._timesteps is None:  # called outside a U-Net forward (e.g. a merge): the adapter at full rank
            return output
        channel = 1 if isinstance(module, torch.nn.Conv2d) else output.dim() - 1
        mask = self._mask(output.shape[channel], output.device, output.dtype)  # [B or 1, rank]
        if mask.shape[0] not in (1, output.shape[0]):
            raise RuntimeError(
                f"timestep rank mask: {mask.shape[0]} timesteps for a batch of {output.shape[0]} in {module}"
            )
        shape = [mask.shape[0]] + [1] * (output.dim() - 1)
        shape[channel] = mask.shape[1]
        return output * mask.reshape(shape)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
