"""The adapter in plain diffusers, with no lorakit at render time: what a script or a service would do.

Run after example 01, from the repository root:  python examples/06-load-in-diffusers.py
It renders example 01's first prompt with seed 0, as `lorakit generate` did there (Euler sampler, 20 steps,
guidance 2), and compares the two pictures pixel by pixel. For a real model: BASE=<hub id or folder>, your
adapter, your prompt and size (512x512 for SD 1.5, 1024x1024 for SDXL with StableDiffusionXLPipeline).
"""

import os
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image, ImageChops

BASE = os.environ.get("BASE", str(Path.home() / ".cache" / "lorakit" / "toy-base-v2"))
OUT = Path(os.environ.get("OUT", "examples-out"))
ADAPTER = OUT / "runs" / "first-lora" / "first-lora.safetensors"  # the kohya file; first-lora.diffusers.* loads too
PROMPT = "a sks ball on the left, white background"

pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # `lorakit generate --sampler euler`
pipe.load_lora_weights(str(ADAPTER))  # at full strength; pipe.set_adapters(..., adapter_weights=0.8) lowers it
pipe.set_progress_bar_config(disable=True)
image = pipe(
    PROMPT,
    width=16,
    height=16,
    num_inference_steps=20,
    guidance_scale=2.0,
    generator=torch.Generator("cpu").manual_seed(0),  # lorakit seeds a CPU generator, on every device
).images[0]
image.save(OUT / "diffusers.png")

# Example 01's grid images are named <index>-seed<seed>-x<scale>.png; the first at scale 1 is this prompt's.
lorakit_image = Image.open(sorted((OUT / "compare").glob("*-seed0-x1.png"))[0]).convert("RGB")
difference = max(high for _, high in ImageChops.difference(image.convert("RGB"), lorakit_image).getextrema())
print(f"{OUT / 'diffusers.png'}: largest difference from lorakit generate's picture: {difference} of 255")
