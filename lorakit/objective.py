"""The denoising objective as pure functions: timesteps, noise, targets and loss weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def sample_noise(shape: tuple[int, ...], noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise, plus per-channel offset noise when `noise_offset` > 0.

    Offset noise (Guttenberg, "Diffusion with Offset Noise", 2023) lets the model change an
    image's mean brightness, which plain noise almost never teaches it.
    """
    import torch

    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform training timesteps in [0, num_train_timesteps)."""
    import torch

    return torch.randint(0, num_train_timesteps, (batch,), generator=generator)


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
    import torch
    from diffusers.training_utils import compute_snr

    if not min_snr_gamma:
        return torch.ones(timesteps.shape[0])
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    return clipped / (snr + 1 if prediction_type == "v_prediction" else snr)


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error, computed in fp32."""
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))
    return (per_sample * weights.to(per_sample.device)).mean()
