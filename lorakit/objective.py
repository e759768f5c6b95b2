"""The denoising objective as pure functions: timesteps, noise, targets and loss weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.training_utils import compute_snr


def sample_noise(
    shape: tuple[int, ...],
    noise_offset: float,
    generator: torch.Generator,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
    *,
    random_strength: bool = False,
    adaptive_scale: float = 0.0,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gaussian noise, plus per-channel offset noise when `noise_offset` > 0, or multi-resolution noise when
    `multires_iterations` > 0 (see `multires_noise`; the recipe allows one of the two).

    Offset noise (Guttenberg, "Diffusion with Offset Noise", 2023) lets the model change an
    image's mean brightness, which plain noise almost never teaches it. As kohya's options: `random_strength` draws
    the batch's strength uniformly from [0, noise_offset); `adaptive_scale` adds that multiple of each latent
    channel's absolute mean (of `latents`), so images far from mid-grey get more, clamped at 0.
    """

    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        strength: float | torch.Tensor = noise_offset
        if random_strength:
            strength = noise_offset * torch.rand(1, generator=generator)
        if adaptive_scale:
            channel_means = latents.float().mean(dim=(2, 3), keepdim=True).abs()
            strength = (strength + adaptive_scale * channel_means).clamp(min=0)
        noise = noise + strength * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    if multires_iterations:
        noise = multires_noise(noise, multires_iterations, multires_discount, generator)
    return noise


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, as kohya's `multires_noise_iterations`): `noise` plus up to
    `iterations` coarser Gaussian fields, level i drawn at 1 / s**i of the latent size (s uniform in [2, 4) per
    level) and upsampled bilinearly, weighted `discount` ** i; then rescaled to unit variance per sample.

    Plain noise is almost white, so it barely hides the coarse layout and colour of an image at most timesteps;
    the coarse levels make the model also learn to restore large areas. The levels stop once one side is 1.
    """

    batch, channels, height, width = noise.shape
    total = noise.clone()
    for level in range(1, iterations + 1):
        shrink = float(2 + 2 * torch.rand((), generator=generator)) ** level
        size = (max(1, int(height / shrink)), max(1, int(width / shrink)))
        coarse = torch.randn((batch, channels, *size), generator=generator)
        total += discount**level * torch.nn.functional.interpolate(
            coarse, size=(height, width), mode="bilinear", align_corners=False
        )
        if min(size) == 1:
            break
    return total / total.std(dim=(1, 2, 3), keepdim=True)


def perturbed_noise(
    noise: torch.Tensor, gamma: float, generator: torch.Generator, random_strength: bool = False
) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, arXiv:2301.11706; kohya's `ip_noise_gamma`): the noise the latents are
    noised with is `noise + gamma * n` for fresh Gaussian n, while the target stays `noise`. It mimics the error a
    sampler's own earlier steps leave in its input (exposure bias). `random_strength` (kohya's
    `ip_noise_gamma_random_strength`) draws the batch's gamma uniformly from [0, gamma) first. `gamma` 0 returns
    `noise` itself."""
    if not gamma:
        return noise
    if random_strength:
        gamma = gamma * torch.rand(1, generator=generator).item()
    return noise + gamma * torch.randn(noise.shape, generator=generator)


def sample_timesteps(
    batch: int, low: int, high: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Training timesteps in [low, high): uniform, or drawn by `weights` (one per timestep of the schedule)."""

    if weights is None:
        return torch.randint(low, high, (batch,), generator=generator)
    return torch.multinomial(weights, batch, replacement=True, generator=generator)


def timestep_weights(
    count: int,
    low: int,
    high: int,
    strategy: str,
    multiplier: float,
    portion: float = 0.25,
    begin: int = 0,
    end: int = 1000,
) -> torch.Tensor | None:
    """How often each of a schedule's `count` timesteps is drawn (diffusers' and SimpleTuner's timestep bias), only
    [low, high) at all: `later` the noisiest `portion` of the schedule `multiplier` times as often as the rest,
    `earlier` the least noisy, `range` [begin, end). None for `none` (uniform). ValueError when nothing would be
    drawn."""
    if strategy == "none":
        return None
    weights = torch.ones(count, dtype=torch.float64)
    biased = max(1, int(portion * count))
    span = {"earlier": slice(0, biased), "later": slice(count - biased, count), "range": slice(begin, end)}[strategy]
    weights[span] *= multiplier
    weights[:low] = 0
    weights[high:] = 0
    if not weights.sum():
        raise ValueError(f"the timestep bias leaves no timestep in [{low}, {high}) to draw")
    return weights / weights.sum()


def training_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the U-Net should predict: the noise (epsilon) or the velocity (v-prediction, Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


DEBIASED_SNR_CAP = 1000.0  # SNR above this counts as this in the debiased weight (kohya's cap): low-noise steps
# keep a weight of at least 1 / sqrt(1000) instead of vanishing; and SNR below 1 / DEBIASED_SNR_CAP counts as that,
# so that a zero-terminal-SNR schedule's last step (SNR 0) does not get an infinite weight (SD's own schedule never
# goes below 0.0047)


def loss_weights(
    scheduler: Any,
    timesteps: torch.Tensor,
    min_snr_gamma: float,
    prediction_type: str,
    debiased: bool = False,
    v_like_noise: bool = False,
    v_like_loss: float = 0.0,
) -> torch.Tensor:
    """Per-sample loss weights: ones, times Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556) when `min_snr_gamma`
    is set, times the debiased-estimation weight (Yu et al. 2024, arXiv:2310.08442) when `debiased`.

    Min-SNR weights each timestep by min(SNR, gamma) / SNR for epsilon targets and
    min(SNR, gamma) / (SNR + 1) for v targets, so that easy low-noise steps stop dominating.
    Debiased estimation weights it by 1 / sqrt(SNR) (epsilon) or 1 / sqrt(SNR + 1) (v), SNR kept within
    `DEBIASED_SNR_CAP` and its inverse (kohya caps it above), as kohya's `debiased_estimation_loss` does: the noisy
    steps, where the layout and the
    subject's shape are decided, count more than the almost clean ones.
    `v_like_noise` (v-prediction only; kohya's `scale_v_pred_loss_like_noise_pred`) multiplies by SNR / (SNR + 1),
    SNR capped at `DEBIASED_SNR_CAP` as kohya caps it: a v target's error then weighs what the same model's noise
    error would.
    `v_like_loss` (epsilon-prediction only; kohya's `v_pred_like_loss`) multiplies by 1 + v_like_loss x (SNR + 1) /
    SNR: it adds that share of the loss a v target would give for the same error, which grows on noisy steps.
    SNR is kept within `DEBIASED_SNR_CAP` and its inverse (kohya caps it above only, so a zero-terminal-SNR
    schedule's last step would get an infinite weight there).
    """

    weights = torch.ones(timesteps.shape[0])
    if not min_snr_gamma and not debiased and not v_like_noise and not v_like_loss:
        return weights
    snr = compute_snr(scheduler, timesteps)
    if min_snr_gamma:
        clipped = torch.clamp(snr, max=min_snr_gamma)
        if prediction_type == "v_prediction":
            weights = clipped / (snr + 1)
        else:  # min(SNR, gamma) / SNR tends to 1 as SNR -> 0; a zero-terminal-SNR schedule reaches SNR = 0 exactly
            weights = torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if debiased:
        capped = snr.clamp(min=1 / DEBIASED_SNR_CAP, max=DEBIASED_SNR_CAP)
        weights = weights / (capped + 1 if prediction_type == "v_prediction" else capped).sqrt()
    if v_like_noise:
        capped = snr.clamp(max=DEBIASED_SNR_CAP)
        weights = weights * capped / (capped + 1)
    if v_like_loss:
        capped = snr.clamp(min=1 / DEBIASED_SNR_CAP, max=DEBIASED_SNR_CAP)
        weights = weights * (1 + v_like_loss * (capped + 1) / capped)
    return weights


def huber_thresholds(
    scheduler: Any, timesteps: torch.Tensor, huber_c: float, schedule: str = "constant", scale: float = 1.0
) -> torch.Tensor:
    """The pseudo-Huber threshold of each sample ([B], float32) at its timestep (kohya's `huber_schedule`).

    `constant`: huber_c x scale. `exponential`: exp(-a t) x scale with a = -ln(huber_c) / T, from `scale` at t = 0
    to huber_c x scale at t = T. `snr`: (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t =
    sqrt((1 - alphabar_t) / alphabar_t): near 1 (squared error) on almost clean steps, near huber_c on noisy ones
    (Khrapov et al. 2024, arXiv:2403.16728)."""
    timesteps = timesteps.long().cpu()
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * scale, dtype=torch.float32)
    if schedule == "exponential":
        rate = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.double()).float() * scale
    if schedule == "snr":
        alphas = scheduler.alphas_cumprod.double().cpu()[timesteps]
        sigmas = ((1 - alphas) / alphas).sqrt()
        return ((1 - huber_c) / (1 + sigmas) ** 2 + huber_c).float()
    raise ValueError(f"unknown huber schedule {schedule!r}")


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float | torch.Tensor = 0.1
) -> torch.Tensor:
    """Per-element loss in fp32: squared error (`l2`), absolute error (`l1`), or a pseudo-Huber loss.

    `huber` is 2c(sqrt(d^2 + c^2) - c) and `smooth_l1` 2(sqrt(d^2 + c^2) - c): quadratic near zero,
    linear for outliers (Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption
    Resistance using Scheduled Pseudo-Huber Loss", arXiv:2403.16728). `huber_c` is one threshold, or one per
    sample ([B], `huber_thresholds`).
    """

    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2)
    if loss_type == "l1":
        return diff.abs()
    if torch.is_tensor(huber_c):
        huber_c = huber_c.to(diff.device, diff.dtype).reshape(-1, *[1] * (diff.dim() - 1))
    smooth = torch.sqrt(diff.pow(2) + huber_c**2) - huber_c
    if loss_type == "huber":
        return 2 * huber_c * smooth
    if loss_type == "smooth_l1":
        return 2 * smooth
    raise ValueError(f"unknown loss_type {loss_type!r}")


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    loss_type: str = "l2",
    huber_c: float | torch.Tensor = 0.1,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample mean of the elementwise loss, weighted, averaged over the batch.

    `pixel_weights` ([B, 1, h, w], masked loss) weight each latent position; each sample's loss is then the
    weighted mean (divided by its mean weight), so an all-ones map gives exactly the unmasked loss."""
    elementwise = elementwise_loss(prediction, target, loss_type, huber_c)
    dims = tuple(range(1, prediction.ndim))
    if pixel_weights is None:
        per_sample = elementwise.mean(dim=dims)
    else:
        pixel_weights = pixel_weights.to(elementwise.device, elementwise.dtype)
        per_sample = (elementwise * pixel_weights).mean(dim=dims) / pixel_weights.mean(dim=dims).clamp_min(1e-6)
    return (per_sample * weights.to(per_sample.device)).mean()
