"""lorakit: LoRA fine-tuning for personal Stable Diffusion models."""

__version__ = "0.1.0"
