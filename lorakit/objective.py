"""The denoising objective as pure functions: timesteps, noise, targets and loss weights."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.training_utils import compute_snr


def sample_noise(shape: tuple[int, ...], noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise, plus per-channel offset noise when `noise_offset` > 0.

    Offset noise (Guttenberg, "Diffusion with Offset Noise", 2023) lets the model change an
    image's mean brightness, which plain noise almost never teaches it.
    """

    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def sample_timesteps(batch: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform training timesteps in [low, high)."""

    return torch.randint(low, high, (batch,), generator=generator)


def training_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the U-Net should predict: the noise (epsilon) or the velocity (v-prediction, Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def loss_weights(scheduler: Any, timesteps: torch.Tensor, min_snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights: ones, or Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556).

    Min-SNR weights each timestep by min(SNR, gamma) / SNR for epsilon targets and
    min(SNR, gamma) / (SNR + 1) for v targets, so that easy low-noise steps stop dominating.
    """

    if not min_snr_gamma:
        return torch.ones(timesteps.shape[0])
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # epsilon: min(SNR, gamma) / SNR tends to 1 as SNR -> 0; a zero-terminal-SNR schedule reaches SNR = 0 exactly
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.1
) -> torch.Tensor:
    """Per-element loss in fp32: squared error, or a pseudo-Huber loss.

    `huber` is 2c(sqrt(d^2 + c^2) - c) and `smooth_l1` 2(sqrt(d^2 + c^2) - c): quadratic near zero,
    linear for outliers (Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption
    Resistance using Scheduled Pseudo-Huber Loss", arXiv:2403.16728).
    """

    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2)
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
    huber_c: float = 0.1,
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
