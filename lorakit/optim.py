"""Optimizers and learning-rate schedules for the adapter parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffusers.optimization import get_scheduler

from .errors import LorakitError

if TYPE_CHECKING:
    from .recipe import TrainSection


def build_optimizer(section: TrainSection, param_groups: list[dict[str, Any]]) -> Any:
    """The optimizer named by `train.optimizer` over `param_groups` (each with its own `lr`).

    Each optimizer's package is imported only when chosen: bitsandbytes probes its CPU/GPU backends on import,
    prodigyopt is optional, and a missing one becomes a one-line message naming the key."""
    name = section.optimizer
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise LorakitError(
                f"train.optimizer: 'adamw8bit' needs bitsandbytes ({err}); "
                'run `pip install bitsandbytes` or set train.optimizer = "adamw"'
            ) from None
        return bnb.optim.AdamW8bit(param_groups, weight_decay=section.weight_decay)
    if name == "adamw":
        import torch

        # The fused kernel where every parameter is on CUDA already (set_up moves them there first); elsewhere the
        # multi-tensor (foreach) one, which torch picks by itself only on CUDA: on a CPU the per-tensor loop costs
        # several milliseconds a step over the hundreds of small LoRA tensors.
        if all(p.is_cuda for group in param_groups for p in group["params"]):
            return torch.optim.AdamW(param_groups, weight_decay=section.weight_decay, fused=True)
        return torch.optim.AdamW(param_groups, weight_decay=section.weight_decay, foreach=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            param_groups,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=section.weight_decay,
        )
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise LorakitError(
                "train.optimizer: 'prodigy' needs the prodigyopt package; "
                "run `pip install prodigyopt` or choose 'adamw8bit'"
            ) from None
        return Prodigy(param_groups, weight_decay=section.weight_decay)
    raise LorakitError(f"train.optimizer: unknown optimizer {name!r}")


def build_lr_scheduler(section: TrainSection, optimizer: Any) -> Any:
    """The learning-rate schedule, stepped once per optimizer step over `max_steps` (resolved by then)."""

    return get_scheduler(
        section.lr_scheduler,
        optimizer,
        num_warmup_steps=section.lr_warmup_steps,
        num_training_steps=section.max_steps,
        num_cycles=section.lr_scheduler_num_cycles,
        power=section.lr_scheduler_power,
    )
