"""`train.stochastic_rounding` (full_bf16's default): each optimizer step runs in float32 and the bfloat16 weights and
state are rounded back at random, exact on average, so updates below half a bfloat16 step still add up."""

from __future__ import annotations

import typing

import pytest
import torch

from lorakit.errors import RecipeError
from lorakit.memory import (
    STATE_IN_PARAMETER_DTYPE,
    WHOLE_STEP_OPTIMIZERS,
    estimate,
    optimizer_state_bytes,
    rounding_chunk,
)
from lorakit.optim import build_optimizer, step_rounding_stochastically, stochastic_round_
from lorakit.recipe import recipe_from_dict
from lorakit.recipe.sections import Optimizer
from lorakit.train import train

from .conftest import allocation_peak, make_recipe_dict

SIZES = [8192, 64 * 80, 300]  # 8-bit state for the first two, bitsandbytes' float32 state for the last


def _neighbours(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 numbers just below and just above each float32 value (both the value itself when it is one)."""
    down = values.view(torch.int32).bitwise_and(-(1 << 16)).view(torch.float32)
    up = (values.view(torch.int32).bitwise_and(-(1 << 16)) + (1 << 16)).view(torch.float32)
    exact = down == values
    return down, torch.where(exact, down, up)


def test_stochastic_rounding_picks_a_neighbour_with_the_chance_that_makes_it_exact_on_average():
    values = torch.tensor([1 + 2**-9, 1 + 3 * 2**-10, -(1 + 2**-9), 3.0e-3 * (1 + 2**-10), -7.25, 0.0])
    down, up = _neighbours(values)
    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(4000):
        rounded = torch.empty(values.shape, dtype=torch.bfloat16)
        stochastic_round_(rounded, values, generator)
        draws.append(rounded.float())
    draws = torch.stack(draws)
    assert ((draws == down) | (draws == up)).all()  # never further than the two neighbours
    share_up = (draws == up).float().mean(0)
    expected = torch.where(up == down, torch.ones_like(values), (values - down) / (up - down))
    assert torch.allclose(share_up, expected, atol=0.03), (share_up, expected)  # 1/4, 3/4, ... of the time
    assert torch.allclose(draws.mean(0), values, rtol=2e-4, atol=0)
    exact = up == down  # -7.25 and 0 are bfloat16 numbers: never moved
    assert (draws[:, exact] == values[exact]).all()
    # the same generator seed draws the same roundings (a resumed run continues bit for bit)
    again = [torch.empty(values.shape, dtype=torch.bfloat16) for _ in range(2)]
    for target in again:
        stochastic_round_(target, values.repeat(1), torch.Generator().manual_seed(5))
    assert torch.equal(again[0], again[1])


def _optimizer(name: str, rate: float, params: list[torch.nn.Parameter]):
    recipe = recipe_from_dict(
        make_recipe_dict(".", ".", ".", train={"optimizer": name, "unet_lr": rate, "weight_decay": 0.0})
    )
    return build_optimizer(recipe.train, [{"params": params, "lr": rate}])


def _descend(
    name: str, mode: str, steps: int, chunk: int | None = 6000
) -> tuple[float, list[torch.nn.Parameter], typing.Any]:
    """`steps` steps from weights of 1 down a fixed gradient: float32 weights, bfloat16 ones rounded to nearest, or
    bfloat16 ones rounded stochastically, `chunk` values at a time where the optimizer allows it (SIZES in two runs).
    Returns the mean weight, the weights and the optimizer."""
    rate = 1.0 if name == "prodigy" else 1e-3  # each step moves a weight of 1 by about 1e-3: under half its step
    dtype = torch.float32 if mode == "float32" else torch.bfloat16
    params = [torch.nn.Parameter(torch.ones(n, dtype=dtype)) for n in SIZES]
    optimizer = _optimizer(name, rate, params)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        for p in params:
            p.grad = (0.5 + torch.rand(p.shape, generator=torch.Generator().manual_seed(step))).to(dtype)
        if mode == "stochastic":
            at_once = None if name in WHOLE_STEP_OPTIMIZERS else chunk
            step_rounding_stochastically(optimizer, generator, name in STATE_IN_PARAMETER_DTYPE, at_once)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return torch.cat([p.detach().float() for p in params]).mean().item(), params, optimizer


@pytest.mark.parametrize("name", typing.get_args(Optimizer))
def test_small_updates_add_up_with_every_optimizer_and_the_state_keeps_its_dtype(name):
    """Rounded to nearest, bfloat16 weights of 1 never move under updates of 1e-3 (half their step is 2^-8); rounded
    stochastically they land where float32 weights do (Prodigy, whose step size grows without bound down a fixed
    gradient, runs 10 steps and only has to move). The state is what it is without the rounding, so the planner's
    bytes still hold: bfloat16 for AdamW, schedule-free AdamW and Prodigy, 8-bit for bitsandbytes'."""
    steps = 10 if name == "prodigy" else 60
    exact, _, _ = _descend(name, "float32", steps)
    nearest, _, _ = _descend(name, "nearest", steps)
    rounded, params, optimizer = _descend(name, "stochastic", steps)
    moved = 1 - exact
    assert moved > 0.01 and nearest == 1.0, (moved, nearest)
    if name == "prodigy":
        assert 1 - rounded > moved / 2, (rounded, exact)
    else:
        assert abs(rounded - exact) < 0.03 * moved, (rounded, exact, nearest)
    assert {p.dtype for p in params} == {torch.bfloat16}
    ignored = ("step", "qmap1", "qmap2", "RMS")
    state = [t for p in params for k, t in optimizer.state[p].items() if torch.is_tensor(t) and k not in ignored]
    assert sum(t.numel() * t.element_size() for t in state) == optimizer_state_bytes(name, SIZES, 2)
    if name in ("adamw8bit", "lion8bit", "ademamix8bit"):
        assert any(t.dtype == torch.uint8 for t in state)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "lion8bit", "adafactor"])
def test_a_step_in_chunks_is_the_step_at_once(name):
    """Optimizers that step each tensor on its own give the same weights and state bit for bit whether the float32
    copies are made all at once or a few thousand values at a time."""
    _, whole, whole_optimizer = _descend(name, "stochastic", 5, chunk=None)
    for chunk in (6000, 1):  # two runs; one tensor at a time
        _, params, optimizer = _descend(name, "stochastic", 5, chunk=chunk)
        for a, b in zip(whole, params, strict=True):
            assert torch.equal(a, b)
            for key, value in whole_optimizer.state[a].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(optimizer.state[b][key])), key


def test_a_parameter_without_a_gradient_is_left_as_it_is():
    params = [torch.nn.Parameter(torch.full((4096,), 1 + 2**-7, dtype=torch.bfloat16)) for _ in range(2)]
    before = params[1].detach().clone()
    optimizer = _optimizer("adamw", 1e-3, params)
    params[0].grad = torch.ones_like(params[0])
    step_rounding_stochastically(optimizer, torch.Generator().manual_seed(0), True, None)
    assert torch.equal(params[1].detach(), before) and params[1] not in optimizer.state
    assert params[0].dtype == params[1].dtype == torch.bfloat16 and params[0].grad is None


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_the_plan_counts_the_float32_copies_of_the_step(name):
    """The planner's optimizer-step parts with stochastic rounding, less those without, against what the CPU
    allocator saw: the float32 weights, gradients, bfloat16 state lifted to float32, and AdamW's float32 update."""
    sizes = [64 * 320, 320 * 64, 64 * 640, 640 * 64] * 2

    def run(rounding: bool) -> int:
        def steps():
            params = [torch.nn.Parameter(torch.randn(n, dtype=torch.bfloat16)) for n in sizes]
            optimizer = _optimizer(name, 1e-3, params)
            generator = torch.Generator().manual_seed(0)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                if rounding:
                    lifted_state = name in STATE_IN_PARAMETER_DTYPE
                    step_rounding_stochastically(optimizer, generator, lifted_state, rounding_chunk(name))
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return allocation_peak(steps)

    measured = run(True) - run(False)

    def planned(rounding: bool) -> float:
        recipe = recipe_from_dict(
            make_recipe_dict(
                ".",
                ".",
                ".",
                train={
                    "optimizer": name,
                    "mixed_precision": "bf16",
                    "full_bf16": True,
                    "stochastic_rounding": rounding,
                },
            )
        )
        counts = {"unet": 1, "vae": 1, "text_encoder": 1}
        return estimate(recipe, "sd15", counts=counts, trainable=sizes).phase_gib("optimizer step")

    predicted = (planned(True) - planned(False)) * 2**30
    # within 10 % above; bitsandbytes' bfloat16 step holds temporaries of its own that its float32 one does not
    # (adamw8bit: 5.33 bytes measured per trained value against 6 counted)
    assert 0.85 * predicted <= measured <= 1.10 * predicted, (measured, predicted)


def test_a_run_at_a_small_rate_moves_its_bfloat16_adapter_as_far_as_a_float32_one(tiny_base, tiny_dataset, tmp_path):
    """The tiny model at unet_lr 1e-4 with 8-bit AdamW: rounded to nearest, the bfloat16 adapter's update falls
    short of the float32 one's; rounded stochastically, it comes out as long. The log says which rounding runs."""
    sections = {"train": {"max_steps": 40, "unet_lr": 1e-4, "optimizer": "adamw8bit", "mixed_precision": "bf16"}}

    def adapter(name: str, lines: list[str] | None = None, **train_keys) -> dict[str, torch.Tensor]:
        dict_ = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / name, **sections)
        dict_["train"].update(train_keys)
        result = train(recipe_from_dict(dict_), quiet=True, log=(lines if lines is not None else []).append)
        unet = result.models["unet"]
        return {n: p.detach().float() for n, p in unet.named_parameters() if p.requires_grad}

    start = adapter("start", max_steps=1, unet_lr=0.0, text_encoder_lr=0.0)
    lines: list[str] = []
    runs = {
        "float32": adapter("float32"),
        "nearest": adapter("nearest", full_bf16=True, stochastic_rounding=False),
        "stochastic": adapter("stochastic", lines, full_bf16=True),
    }
    said = [line for line in lines if line.startswith("train.full_bf16:")]
    assert len(said) == 1 and "each step rounds them stochastically" in said[0], lines

    def update(kind: str) -> torch.Tensor:  # from where each started: bfloat16 runs from the rounded start
        first = {n: t if kind == "float32" else t.bfloat16().float() for n, t in start.items()}
        return torch.cat([(runs[kind][n] - first[n]).flatten() for n in start])

    full = update("float32")
    share = {k: (torch.dot(update(k), full) / full.norm() ** 2).item() for k in ("nearest", "stochastic")}
    assert share["nearest"] < 0.95, share  # the share of the float32 update each run made
    assert abs(share["stochastic"] - 1) < 0.03, share


def test_stochastic_rounding_without_full_bf16_is_refused_by_name(tiny_base, tiny_dataset, tmp_path):
    refused = "train.stochastic_rounding: rounds the bfloat16 weights of train.full_bf16, and this recipe trains in"
    with pytest.raises(RecipeError, match=refused):
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"stochastic_rounding": True}))
    off = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"stochastic_rounding": False}))
    assert not off.train.rounds_stochastically
