"""The denoising objective against closed forms and against diffusers' own scheduler maths."""

from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lorakit import objective


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _snr(scheduler, t: int) -> float:
    alpha_bar = float(scheduler.alphas_cumprod[t])
    return alpha_bar / (1 - alpha_bar)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_closed_forms(scheduler, prediction_type):
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    gamma = 5.0
    weights = objective.loss_weights(scheduler, timesteps, gamma, prediction_type)
    for t, weight in zip(timesteps.tolist(), weights.tolist(), strict=True):
        snr = _snr(scheduler, t)
        denominator = snr + 1 if prediction_type == "v_prediction" else snr
        assert weight == pytest.approx(min(snr, gamma) / denominator, rel=1e-5)
    # low-noise steps (huge SNR) are damped, high-noise steps keep weight 1 (eps) or SNR/(SNR+1) (v)
    assert weights[0] < 0.01 and weights[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else 0.0, abs=0.01)


def test_no_min_snr_means_unit_weights(scheduler):
    assert torch.equal(objective.loss_weights(scheduler, torch.tensor([3, 700]), 0.0, "epsilon"), torch.ones(2))


def test_targets(scheduler):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([100, 900])
    assert objective.training_target(scheduler, latents, noise, t, "epsilon") is noise
    v = objective.training_target(scheduler, latents, noise, t, "v_prediction")
    assert torch.allclose(v, scheduler.get_velocity(latents, noise, t))
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0
    alpha_bar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(v, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents, atol=1e-6)
    with pytest.raises(ValueError):
        objective.training_target(scheduler, latents, noise, t, "sample")


def test_offset_noise_shifts_each_channel_by_one_draw():
    plain = objective.sample_noise((64, 4, 32, 32), 0.0, torch.Generator().manual_seed(1))
    offset = objective.sample_noise((64, 4, 32, 32), 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(plain, objective.sample_noise((64, 4, 32, 32), 0.0, torch.Generator().manual_seed(1)))
    shift = offset - plain
    # one constant per (sample, channel) ...
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    # ... drawn from N(0, offset^2): the per-channel means spread with std 0.5, plain noise's with ~1/32
    assert 0.4 < float(shift[:, :, 0, 0].std()) < 0.6
    assert float(plain.mean(dim=(2, 3)).std()) < 0.05
    assert float(offset.mean(dim=(2, 3)).std()) > 0.4


def test_timesteps_are_uniform_in_the_half_open_range():
    t = objective.sample_timesteps(20000, 200, 800, torch.Generator().manual_seed(0))
    assert int(t.min()) == 200 and int(t.max()) == 799
    assert abs(float(t.float().mean()) - 499.5) < 5


@pytest.mark.parametrize(
    ("loss_type", "d", "c", "expected"),
    [
        ("l2", 3.0, 0.1, 9.0),
        ("l1", -3.0, 0.1, 3.0),
        ("huber", 3.0, 0.1, 2 * 0.1 * (math.sqrt(9 + 0.01) - 0.1)),
        ("smooth_l1", 3.0, 0.1, 2 * (math.sqrt(9 + 0.01) - 0.1)),
        ("huber", 0.05, 1.0, 2 * 1.0 * (math.sqrt(0.0025 + 1) - 1)),  # ~ d^2 near zero
    ],
)
def test_robust_losses_have_their_values(loss_type, d, c, expected):
    value = objective.elementwise_loss(torch.tensor([d]), torch.tensor([0.0]), loss_type, c)
    assert float(value) == pytest.approx(expected, rel=1e-3)  # float32 arithmetic


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
    c = 0.5
    small = objective.elementwise_loss(torch.tensor([1e-3]), torch.zeros(1), "huber", c)
    assert float(small) == pytest.approx(1e-6, rel=0.05)  # 2c (sqrt(d^2 + c^2) - c) ~ d^2 (float32 rounding)
    far = objective.elementwise_loss(torch.tensor([100.0, 200.0]), torch.zeros(2), "huber", c)
    assert float(far[1] - far[0]) == pytest.approx(2 * c * 100, rel=1e-3)  # slope 2c


def test_diffusion_loss_weights_each_sample():
    prediction = torch.stack([torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 2.0)])
    loss = objective.diffusion_loss(prediction, torch.zeros_like(prediction), torch.tensor([1.0, 0.5]))
    assert float(loss) == pytest.approx((1.0 * 1 + 0.5 * 4) / 2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_is_finite_on_a_zero_terminal_snr_schedule(prediction_type):
    """SNR is exactly 0 at the last timestep of a zero-terminal-SNR schedule: min(SNR, g) / SNR was 0 / 0."""
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    )
    weights = objective.loss_weights(scheduler, torch.tensor([0, 500, 999]), 5.0, prediction_type)
    assert torch.isfinite(weights).all()
    assert float(weights[-1]) == (1.0 if prediction_type == "epsilon" else 0.0)
    latents, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    v = objective.training_target(scheduler, latents, noise, torch.tensor([999]), "v_prediction")
    torch.testing.assert_close(v, -latents)  # pure noise in: v is minus the clean latents


def test_multires_noise_adds_coarse_levels_at_unit_variance():
    shape = (16, 4, 64, 64)
    plain = objective.sample_noise(shape, 0.0, torch.Generator().manual_seed(2))
    pyramid = objective.sample_noise(shape, 0.0, torch.Generator().manual_seed(2), 6, 0.3)
    again = objective.sample_noise(shape, 0.0, torch.Generator().manual_seed(2), 6, 0.3)
    assert torch.equal(pyramid, again)  # the run's generator decides every level
    # each sample has unit variance again ...
    assert torch.allclose(pyramid.std(dim=(1, 2, 3)), torch.ones(16), atol=1e-5)
    # ... but far more of it in coarse structure: 8x8 block means of white noise spread with std 1/8
    blocks = torch.nn.functional.avg_pool2d
    assert float(blocks(plain, 8).std()) < 0.13
    assert float(blocks(pyramid, 8).std()) > 0.16
    # the first level carries discount ** 1 of the coarse noise: a smaller discount stays closer to white noise
    gentle = objective.sample_noise(shape, 0.0, torch.Generator().manual_seed(2), 6, 0.05)
    assert float(blocks(plain, 8).std()) < float(blocks(gentle, 8).std()) < float(blocks(pyramid, 8).std())


def test_input_perturbation_at_random_strength_draws_one_strength_per_batch():
    noise = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    strengths = []
    for seed in range(40):
        perturbed = objective.perturbed_noise(noise, 0.1, torch.Generator().manual_seed(seed), random_strength=True)
        generator = torch.Generator().manual_seed(seed)  # kohya's order: the strength, then the noise
        strength = 0.1 * torch.rand(1, generator=generator).item()
        torch.testing.assert_close(perturbed, noise + strength * torch.randn(noise.shape, generator=generator))
        strengths.append(float((perturbed - noise).std()))
    assert max(strengths) < 0.1 and min(strengths) < 0.03 and max(strengths) > 0.07  # spread over [0, 0.1)


def test_v_pred_like_loss_adds_that_share_of_the_v_loss(scheduler):
    timesteps = torch.tensor([0, 10, 500, 999])
    weights = objective.loss_weights(scheduler, timesteps, 0.0, "epsilon", v_like_loss=0.3)
    for t, weight in zip(timesteps.tolist(), weights.tolist(), strict=True):
        snr = min(_snr(scheduler, t), objective.DEBIASED_SNR_CAP)  # kohya caps it at 1000 too
        assert weight == pytest.approx(1 + 0.3 * (snr + 1) / snr, rel=1e-5)
    assert weights[-1] > 10 * weights[1]  # noisy steps count more
    both = objective.loss_weights(scheduler, timesteps, 5.0, "epsilon", v_like_loss=0.3)
    torch.testing.assert_close(both, objective.loss_weights(scheduler, timesteps, 5.0, "epsilon") * weights)
    zero_terminal = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    last = objective.loss_weights(zero_terminal, torch.tensor([999]), 0.0, "epsilon", v_like_loss=0.3)
    assert torch.isfinite(last).all()  # SNR 0 there: kept at 1 / 1000


def test_v_pred_like_loss_is_refused_on_a_v_prediction_base(tiny_base_v, tiny_dataset, tmp_path):
    from lorakit.errors import RecipeError
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    from .conftest import make_recipe_dict

    settings = {"max_steps": 1, "v_pred_like_loss": 0.2}
    recipe = recipe_from_dict(make_recipe_dict(tiny_base_v, tiny_dataset, tmp_path, train=settings))
    with pytest.raises(RecipeError, match="train.v_pred_like_loss: .* already predicts v"):
        train(recipe, quiet=True, log=lambda _: None)


def test_input_perturbation_adds_its_share_of_fresh_noise():
    noise = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    assert objective.perturbed_noise(noise, 0.0, torch.Generator().manual_seed(1)) is noise
    perturbed = objective.perturbed_noise(noise, 0.1, torch.Generator().manual_seed(1))
    extra = perturbed - noise
    assert 0.09 < float(extra.std()) < 0.11
    assert abs(float((extra * noise).mean())) < 0.01  # independent of the target noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_weights_follow_the_closed_form_and_multiply_min_snr(scheduler, prediction_type):
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    debiased = objective.loss_weights(scheduler, timesteps, 0.0, prediction_type, debiased=True)
    for t, weight in zip(timesteps.tolist(), debiased.tolist(), strict=True):
        snr = min(_snr(scheduler, t), objective.DEBIASED_SNR_CAP)  # SD's schedule stays above 1 / cap
        assert weight == pytest.approx(1 / math.sqrt(snr + 1 if prediction_type == "v_prediction" else snr), rel=1e-5)
    assert debiased[-1] > 10 * debiased[0]  # noisy steps count more than almost clean ones
    both = objective.loss_weights(scheduler, timesteps, 5.0, prediction_type, debiased=True)
    min_snr = objective.loss_weights(scheduler, timesteps, 5.0, prediction_type)
    torch.testing.assert_close(both, min_snr * debiased)


def test_debiased_weights_stay_finite_on_a_zero_terminal_snr_schedule():
    zero_terminal = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    weights = objective.loss_weights(zero_terminal, torch.tensor([0, 500, 999]), 0.0, "epsilon", debiased=True)
    assert torch.isfinite(weights).all()
    assert float(weights[-1]) == pytest.approx(objective.DEBIASED_SNR_CAP**0.5, rel=1e-5)


def test_huber_thresholds_follow_kohyas_schedules():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    t = torch.tensor([0, 500, 999])
    constant = objective.huber_thresholds(scheduler, t, 0.1, "constant", 2.0)
    assert torch.allclose(constant, torch.full((3,), 0.2))
    exponential = objective.huber_thresholds(scheduler, torch.tensor([0, 1000]), 0.1, "exponential", 2.0)
    assert torch.allclose(exponential, torch.tensor([2.0, 0.2]))  # from the scale to huber_c x scale
    snr = objective.huber_thresholds(scheduler, t, 0.1, "snr")
    alphas = scheduler.alphas_cumprod[t].double()
    expected = 0.9 / (1 + ((1 - alphas) / alphas).sqrt()) ** 2 + 0.1
    assert torch.allclose(snr, expected.float())
    assert snr[0] > 0.8 and snr[2] < 0.11 and bool((snr[:-1] > snr[1:]).all())  # l2-like when clean, robust when noisy
    # Per-sample thresholds reach each sample's elements.
    prediction, target = torch.full((2, 4, 2, 2), 3.0), torch.zeros(2, 4, 2, 2)
    per_sample = objective.elementwise_loss(prediction, target, "huber", torch.tensor([0.1, 1.0]))
    assert torch.allclose(per_sample[0], objective.elementwise_loss(prediction[:1], target[:1], "huber", 0.1)[0])
    assert torch.allclose(per_sample[1], objective.elementwise_loss(prediction[:1], target[:1], "huber", 1.0)[0])


def test_the_training_step_uses_the_scheduled_huber_threshold(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    from safetensors import safe_open

    import lorakit.train.loop as loop
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    from .conftest import make_recipe_dict

    seen = {}
    real_thresholds, real_loss = loop.objective.huber_thresholds, loop.objective.diffusion_loss

    def thresholds(scheduler, timesteps, huber_c, schedule, scale):
        seen["thresholds"] = real_thresholds(scheduler, timesteps, huber_c, schedule, scale)
        seen["expected"] = real_thresholds(scheduler, timesteps, 0.2, "snr")
        return seen["thresholds"]

    def loss(prediction, target, weights, loss_type, huber_c, pixel_weights):
        seen["used"] = (loss_type, huber_c)
        return real_loss(prediction, target, weights, loss_type, huber_c, pixel_weights)

    monkeypatch.setattr(loop.objective, "huber_thresholds", thresholds)
    monkeypatch.setattr(loop.objective, "diffusion_loss", loss)
    settings = {"max_steps": 1, "loss_type": "huber", "huber_c": 0.2, "huber_schedule": "snr"}
    result = train(
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train=settings)),
        quiet=True,
        log=lambda _: None,
    )
    assert seen["used"][0] == "huber" and seen["used"][1] is seen["thresholds"]
    assert torch.equal(seen["thresholds"], seen["expected"]) and seen["thresholds"].dim() == 1  # one per sample
    with safe_open(str(result.adapter), "pt") as f:
        metadata = f.metadata()
    assert (metadata["ss_loss_type"], metadata["ss_huber_schedule"], metadata["ss_huber_c"]) == ("huber", "snr", "0.2")
    # the absolute error is used as asked, without a threshold
    seen.clear()
    settings = {"max_steps": 1, "loss_type": "l1"}
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "l1", train=settings))
    result = train(recipe, quiet=True, log=lambda _: None)
    assert seen["used"][0] == "l1" and "thresholds" not in seen
    with safe_open(str(result.adapter), "pt") as f:
        assert f.metadata()["ss_loss_type"] == "l1"


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        (
            {"huber_schedule": "snr"},
            "train.huber_schedule: shapes the huber / smooth_l1 threshold; set train.loss_type",
        ),
        ({"loss_type": "huber", "huber_schedule": "snr", "huber_scale": 2.0}, "train.huber_scale: the snr schedule"),
        ({"loss_type": "huber", "huber_c": 0.0}, "train.huber_c: 0.0 is outside"),
        ({"loss_type": "l1", "huber_scale": 2.0}, "train.huber_scale: shapes the huber / smooth_l1 threshold"),
        ({"ip_noise_gamma_random_strength": True}, "train.ip_noise_gamma_random_strength: shapes the input"),
        ({"v_pred_like_loss": -0.1}, "train.v_pred_like_loss: -0.1 is outside"),
    ],
)
def test_huber_settings_without_a_huber_loss_are_refused(keys, fragment):
    from lorakit.errors import RecipeError
    from lorakit.recipe import recipe_from_dict

    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({"model": {"base": "x/y"}, "train": keys})
    assert fragment in str(caught.value)


def test_offset_noise_random_strength_and_adaptive_scale():
    shape, offset = (2, 4, 8, 8), 0.1

    def draws(seed, random_strength):
        generator = torch.Generator().manual_seed(seed)
        plain = torch.randn(shape, generator=generator)
        fraction = torch.rand(1, generator=generator) if random_strength else torch.ones(1)
        return plain, fraction, torch.randn((2, 4, 1, 1), generator=generator)

    # random strength: the batch's strength is a uniform fraction of noise_offset
    plain, fraction, channel = draws(3, True)
    noise = objective.sample_noise(shape, offset, torch.Generator().manual_seed(3), random_strength=True)
    assert 0 < float(fraction) < 1
    assert torch.allclose(noise, plain + offset * fraction * channel)
    # adaptive: each channel's absolute latent mean, times the scale, is added to the strength
    latents = torch.zeros(shape)
    latents[:, 1] = -5.0
    plain, _, channel = draws(4, False)
    noise = objective.sample_noise(
        shape, offset, torch.Generator().manual_seed(4), adaptive_scale=0.2, latents=latents
    )
    strength = torch.full((2, 4, 1, 1), offset)
    strength[:, 1] += 0.2 * 5.0
    assert torch.allclose(noise, plain + strength * channel)
    # negative scales never make the offset negative
    noise = objective.sample_noise(
        shape, offset, torch.Generator().manual_seed(4), adaptive_scale=-1.0, latents=latents
    )
    strength[:, 1] = 0.0
    assert torch.allclose(noise, plain + strength * channel)


def test_v_prediction_loss_scaled_like_noise_prediction():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    t = torch.tensor([10, 500, 990])
    snr = compute_snr(scheduler, t)
    weights = objective.loss_weights(scheduler, t, 0.0, "v_prediction", v_like_noise=True)
    assert torch.allclose(weights, snr / (snr + 1))
    both = objective.loss_weights(scheduler, t, 5.0, "v_prediction", v_like_noise=True)
    assert torch.allclose(both, objective.loss_weights(scheduler, t, 5.0, "v_prediction") * snr / (snr + 1))


def test_scale_v_pred_loss_needs_a_v_prediction_base(tiny_base, tiny_base_v, tiny_dataset, tmp_path):
    from safetensors import safe_open

    from lorakit.recipe import dump_recipe, recipe_from_dict
    from lorakit.train import train

    from .conftest import make_recipe_dict
    from .invoke import fails

    settings = {"max_steps": 1, "scale_v_pred_loss_like_noise_pred": True}
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "eps", train=settings))
    path = tmp_path / "eps.toml"
    path.write_text(dump_recipe(recipe), encoding="utf-8")
    fails(["train", str(path), "--quiet"], "train.scale_v_pred_loss_like_noise_pred: ")
    assert not (tmp_path / "eps" / "run").exists()
    recipe = recipe_from_dict(make_recipe_dict(tiny_base_v, tiny_dataset, tmp_path / "v", train=settings))
    result = train(recipe, quiet=True, log=lambda _: None)
    with safe_open(str(result.adapter), "pt") as handle:
        assert handle.metadata()["ss_scale_v_pred_loss_like_noise_pred"] == "True"


@pytest.mark.parametrize("key", ["noise_offset_random_strength", "adaptive_noise_scale"])
def test_offset_noise_options_without_offset_noise_are_refused(key):
    from lorakit.errors import RecipeError
    from lorakit.recipe import recipe_from_dict

    value = True if key == "noise_offset_random_strength" else 0.01
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({"model": {"base": "x/y"}, "train": {key: value}})
    assert f"train.{key}: shapes the offset noise; set train.noise_offset" in str(caught.value)


def test_timestep_bias_draws_the_biased_timesteps_as_often_as_asked():
    from lorakit.objective import sample_timesteps, timestep_weights

    assert timestep_weights(1000, 0, 1000, "none", 2.0) is None
    later = timestep_weights(1000, 0, 1000, "later", 2.0, portion=0.25)
    assert later[750:].sum().item() == pytest.approx(500 / 1250) and later[999] == 2 * later[0]
    drawn = sample_timesteps(20_000, 0, 1000, torch.Generator().manual_seed(0), later)
    assert (drawn >= 750).float().mean().item() == pytest.approx(0.4, abs=0.015)
    earlier = timestep_weights(1000, 100, 900, "earlier", 3.0, portion=0.2)  # min/max still bound it
    drawn = sample_timesteps(20_000, 100, 900, torch.Generator().manual_seed(1), earlier)
    assert drawn.min() >= 100 and drawn.max() < 900
    assert (drawn < 200).float().mean().item() == pytest.approx(300 / 1000, abs=0.015)  # 100 x3 of 100 x3 + 700
    ranged = timestep_weights(1000, 0, 1000, "range", 0.0, begin=0, end=500)
    assert sample_timesteps(1000, 0, 1000, torch.Generator().manual_seed(2), ranged).min() >= 500
    with pytest.raises(ValueError, match=r"leaves no timestep in \[0, 500\) to draw"):
        timestep_weights(1000, 0, 500, "range", 0.0, begin=0, end=500)


def test_training_draws_its_timesteps_with_the_bias(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    from lorakit import objective
    from lorakit.errors import RecipeError
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    from .conftest import make_recipe_dict

    drawn = []
    original = objective.sample_timesteps
    monkeypatch.setattr(objective, "sample_timesteps", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    bias = {"timestep_bias": "range", "timestep_bias_end": 600, "timestep_bias_multiplier": 0.0, "max_steps": 3}
    train(
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "a", train=bias)),
        quiet=True,
        log=lambda _: None,
    )
    assert len(drawn) == 3 and min(int(t.min()) for t in drawn) >= 600
    bias["max_timestep"] = 600  # the bias and the bounds together leave nothing: said before the run starts
    with pytest.raises(RecipeError, match=r"train.timestep_bias: the timestep bias leaves no timestep in \[0, 600\)"):
        train(
            recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "b", train=bias)),
            quiet=True,
            log=lambda _: None,
        )
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"timestep_bias_portion": 0.5}, "train.timestep_bias_portion: not used by train.timestep_bias = 'none'"),
        ({"timestep_bias": "later", "timestep_bias_end": 500}, "train.timestep_bias_end: not used by"),
        ({"timestep_bias": "later", "timestep_bias_multiplier": 1.0}, "1 draws the biased timesteps as often"),
        ({"timestep_bias": "range", "timestep_bias_begin": 500, "timestep_bias_end": 400}, "must be above"),
    ],
)
def test_a_timestep_bias_that_does_nothing_is_refused(tiny_base, tiny_dataset, tmp_path, settings, fragment):
    from lorakit.errors import RecipeError
    from lorakit.recipe import recipe_from_dict

    from .conftest import make_recipe_dict

    with pytest.raises(RecipeError, match=re.escape(fragment)):
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train=settings))
