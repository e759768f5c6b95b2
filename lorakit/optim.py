"""Optimizers and learning-rate schedules for the adapter parameters."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from diffusers.optimization import get_scheduler

from .errors import LorakitError, RecipeError
from .memory import chunked

if TYPE_CHECKING:
    from .recipe import TrainSection

# Each optimizer's defaults for `train.betas` when the recipe leaves it unset (the packages' own).
DEFAULT_BETAS = {
    "adamw8bit": (0.9, 0.999),
    "adamw": (0.9, 0.999),
    "lion8bit": (0.9, 0.99),
    "lion": (0.9, 0.99),
    "prodigy": (0.9, 0.999),
    "adamw_schedulefree": (0.9, 0.999),
    "ademamix8bit": (0.9, 0.999),
}
ADEMAMIX_SLOW_BETA = 0.9999  # AdEMAMix's third coefficient: its slow momentum (bitsandbytes' and the paper's)
SCHEDULE_FREE = ("adamw_schedulefree",)


def hyperparameters(section: TrainSection) -> dict[str, Any]:
    """The recipe's settings of the chosen optimizer, as its keyword arguments (learning rates aside: those come per
    parameter group, and the schedule moves them). A resume puts them back over the checkpoint's, so a changed
    `train.weight_decay` or `train.betas` takes effect as the log says."""
    name = section.optimizer
    options: dict[str, Any] = {"weight_decay": section.weight_decay}
    if name in DEFAULT_BETAS:
        options["betas"] = tuple(section.betas) if section.betas else DEFAULT_BETAS[name]
    if name == "ademamix8bit":
        options["betas"] = (*options["betas"], ADEMAMIX_SLOW_BETA)
    if name == "adafactor":
        options |= {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    if name in SCHEDULE_FREE:  # the warm-up is the optimizer's own: it weighs the average by the warmed-up rate
        options["warmup_steps"] = section.lr_warmup_steps
    if name == "prodigy":
        options |= {
            "d_coef": section.prodigy_d_coef,
            "use_bias_correction": section.prodigy_use_bias_correction,
            "safeguard_warmup": section.prodigy_safeguard_warmup,
        }
    return options


def build_optimizer(section: TrainSection, param_groups: list[dict[str, Any]]) -> Any:
    """The optimizer named by `train.optimizer` over `param_groups` (each with its own `lr`).

    Each optimizer's package is imported only when chosen: bitsandbytes probes its CPU/GPU backends on import,
    prodigyopt is optional, and a missing one becomes a one-line message naming the key."""
    name = section.optimizer
    options = hyperparameters(section)
    if name in ("adamw8bit", "lion8bit", "lion", "ademamix8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise LorakitError(
                f"train.optimizer: {name!r} needs bitsandbytes ({err}); "
                'run `pip install bitsandbytes` or set train.optimizer = "adamw"'
            ) from None
        kind = {
            "adamw8bit": bnb.optim.AdamW8bit,
            "lion8bit": bnb.optim.Lion8bit,
            "lion": bnb.optim.Lion,
            "ademamix8bit": bnb.optim.AdEMAMix8bit,
        }[name]
        return kind(param_groups, **options)
    if name == "adamw":
        # The fused kernel where every parameter is on CUDA already (set_up moves them there first); elsewhere the
        # multi-tensor (foreach) one, which torch picks by itself only on CUDA: on a CPU the per-tensor loop costs
        # several milliseconds a step over the hundreds of small LoRA tensors.
        if all(p.is_cuda for group in param_groups for p in group["params"]):
            return torch.optim.AdamW(param_groups, fused=True, **options)
        return torch.optim.AdamW(param_groups, foreach=True, **options)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, **options)
    if name == "prodigy":
        rates = sorted({group["lr"] for group in param_groups if group["lr"]})
        if len(rates) > 1:  # Prodigy's own check, at its first step, is a traceback
            raise RecipeError(
                f"train.optimizer: Prodigy finds one step size for every parameter and refuses parameter groups "
                f"with different learning rates (here {', '.join(f'{r:g}' for r in rates)}); give train.unet_lr and "
                "train.text_encoder_lr the same value (1.0 is usual), without loraplus_lr_ratio or block-wise rates"
            )
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise LorakitError(
                "train.optimizer: 'prodigy' needs the prodigyopt package; "
                "run `pip install prodigyopt` or choose 'adamw8bit'"
            ) from None
        return Prodigy(param_groups, **options)
    if name == "adamw_schedulefree":
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError:
            raise LorakitError(
                "train.optimizer: 'adamw_schedulefree' needs the schedulefree package; "
                "run `pip install schedulefree` or choose 'adamw8bit'"
            ) from None
        optimizer = AdamWScheduleFree(param_groups, **options)
        optimizer.train()  # it steps only in train mode; lorakit never leaves it (see averaged_weights)
        return optimizer
    raise LorakitError(f"train.optimizer: unknown optimizer {name!r}")


def reapply_hyperparameters(section: TrainSection, optimizer: Any) -> None:
    """After loading a checkpoint's optimizer state (which brings its groups' old settings), set the recipe's."""
    options = hyperparameters(section)
    for group in optimizer.param_groups:
        group.update(options)


def schedule_factor(
    step: int, kind: str, warmup: int, total: int, decay: int = 0, floor: float = 0.0, timescale: int | None = None
) -> float:
    """The share of the learning rate at `step` for lorakit's own schedules, as transformers' schedules of those
    names (kohya's choices) shape them: `cosine_with_min_lr` warms up linearly from 0 over `warmup` steps, then falls
    along a half cosine from 1 to `floor` by `total`; `warmup_stable_decay` warms up from `floor`, stays at 1 and
    falls along a half cosine to `floor` over the last `decay` steps (at most those after the warm-up);
    `inverse_sqrt` warms up linearly from 0, then falls as 1 / sqrt((step + timescale - warmup) / timescale), the
    timescale being `warmup` (10000 without one) unless given."""
    if step < warmup:
        start = floor if kind == "warmup_stable_decay" else 0.0
        return start + (1 - start) * step / max(1, warmup)
    if kind == "inverse_sqrt":
        scale = timescale or warmup or 10_000
        return 1.0 / math.sqrt((step + scale - warmup) / scale)
    if kind == "cosine_with_min_lr":
        start, length = warmup, total - warmup
    elif kind == "warmup_stable_decay":
        length = min(decay, total - warmup)
        start = total - length
        if step < start:
            return 1.0
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    progress = min(1.0, (step - start) / max(1, length))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def averaged_weights(optimizer: Any, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Schedule-free AdamW's weights to use: it steps at y, between its running average x and its iterate z, and x is
    what it is meant to be used at (x = y + (1 - 1/beta1) (z - y), what its `eval()` turns the parameters into). The
    x of each of `params` (by name), computed aside so the parameters are never moved back and forth; None for the
    other optimizers, whose weights are the parameters."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    if not any("train_mode" in group for group in inner.param_groups):
        return None
    beta1 = {id(p): group["betas"][0] for group in inner.param_groups for p in group["params"]}
    averaged = {}
    with torch.no_grad():
        for name, param in params.items():
            z = inner.state.get(param, {}).get("z")
            weight = 1 - 1 / beta1[id(param)]
            averaged[name] = param.detach().clone() if z is None else torch.lerp(param.detach(), z, weight)
    return averaged


def build_lr_scheduler(section: TrainSection, optimizer: Any) -> Any:
    """The learning-rate schedule, stepped once per optimizer step over `max_steps` (resolved by then)."""

    if section.lr_scheduler in ("cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt"):
        kind, warmup, total = section.lr_scheduler, section.lr_warmup_steps, section.max_steps
        decay, floor, timescale = (
            section.lr_decay_steps,
            section.lr_scheduler_min_lr_ratio,
            section.lr_scheduler_timescale,
        )

        def factor(step: int) -> float:
            return schedule_factor(step, kind, warmup, total, decay, floor, timescale)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if section.optimizer in SCHEDULE_FREE:  # no schedule: the rate stays, and the optimizer warms it up itself
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return get_scheduler(
        section.lr_scheduler,
        optimizer,
        num_warmup_steps=section.lr_warmup_steps,
        num_training_steps=section.max_steps,
        num_cycles=section.lr_scheduler_num_cycles,
        power=section.lr_scheduler_power,
    )


# ---- train.stochastic_rounding ---------------------------------------------------------------------------------


def stochastic_round_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Write float32 `source` into bfloat16 `target`, each value rounded down or up at random so that it is exact on
    average (stochastic rounding, as in Zamirai et al. 2020, arXiv:2010.06192): a value a quarter of the way from one
    bfloat16 number to the next becomes the next one a quarter of the time. A bfloat16 number is the upper half of a
    float32's bits, so a random 16-bit number is added to the lower half, which is then cut off; a value bfloat16
    holds exactly is left as it is."""
    bits = source.detach().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, device=bits.device, dtype=torch.int32)
    target.copy_(noise.add_(bits).bitwise_and_(-(1 << 16)).view(torch.float32))


def _full_size(value: Any, param: torch.Tensor) -> bool:
    """Whether an optimizer state entry is a float32 tensor of its parameter's size (not a step count)."""
    return torch.is_tensor(value) and value.dtype == torch.float32 and value.shape == param.shape


def step_rounding_stochastically(
    optimizer: Any, generator: torch.Generator, state_in_parameter_dtype: bool, chunk: int | None
) -> None:
    """One optimizer step over bfloat16 parameters, done in float32 and rounded back stochastically.

    Rounded to nearest, a bfloat16 weight ignores every update smaller than half its step (1/512 to 1/256 of its
    size), and bfloat16 moments stop decaying (0.999 x v rounds back to v). Here each parameter that has a gradient
    steps as a float32 stand-in: the stand-in, with the gradient and the optimizer's bfloat16 state lifted to float32,
    takes the parameter's place in its group and its state for the step; afterwards the weights are written back
    into the parameter with `stochastic_round_`, and that state likewise. The parameter itself never changes dtype:
    that would reset its gradient accumulator, and with it the hooks DDP all-reduces gradients through. State the
    step creates (the first step) is kept in bfloat16 too when the optimizer keeps its state in its parameters'
    dtype (`state_in_parameter_dtype`), as it would have had the parameters stepped in bfloat16; bitsandbytes' 8-bit
    state and Adafactor's float32 factors are never touched. The gradients are dropped afterwards (the loop zeroes
    them next anyway).

    With `chunk`, the parameters step `chunk` values at a time, the others' gradients set aside meanwhile (every
    optimizer skips a parameter without one), so the float32 copies stay that small whatever the adapter's size.
    Only for optimizers that step each tensor on its own: Prodigy's step size and schedule-free AdamW's averaging
    weight come from the whole step, so they take `chunk` None."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    places = {id(p): (g, i) for g, group in enumerate(inner.param_groups) for i, p in enumerate(group["params"])}
    params = [p for group in inner.param_groups for p in group["params"] if p.grad is not None]
    gradients = {id(p): p.grad for p in params}
    for param in params:
        param.grad = None
    for positions in chunked([p.numel() for p in params], chunk):
        lifted = []  # (parameter, its stand-in, the names of its bfloat16 state, whether it had state)
        with torch.no_grad():
            for param in (params[i] for i in positions):
                gradient = gradients.pop(id(param))
                if param.dtype != torch.bfloat16:
                    param.grad = gradient
                    continue
                stand_in = torch.nn.Parameter(param.detach().float())
                stand_in.grad = gradient.float()
                state = inner.state.pop(param, {})
                names = [k for k, v in state.items() if torch.is_tensor(v) and v.dtype == torch.bfloat16]
                for name in names:
                    state[name] = state[name].float()
                if state:
                    inner.state[stand_in] = state
                group, index = places[id(param)]
                inner.param_groups[group]["params"][index] = stand_in
                lifted.append((param, stand_in, names, bool(state)))
        optimizer.step()
        with torch.no_grad():
            for param, stand_in, names, had_state in lifted:
                group, index = places[id(param)]
                inner.param_groups[group]["params"][index] = param
                stochastic_round_(param.data, stand_in, generator)  # in place: the parameter stays what it was
                state = inner.state.pop(stand_in, {})
                if not had_state and state_in_parameter_dtype:  # made by this step, in float32: bfloat16 as meant
                    names = [k for k, v in state.items() if _full_size(v, param)]
                for name in names:
                    rounded = torch.empty_like(state[name], dtype=torch.bfloat16)
                    stochastic_round_(rounded, state[name], generator)
                    state[name] = rounded
                if state:
                    inner.state[param] = state
            for i in positions:
                params[i].grad = None
