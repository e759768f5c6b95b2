"""Driving the CLI in-process, as a user would, for the tests of several commands."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner

from lorakit.cli import app

runner = CliRunner()


def ok(args: list[str]):
    """Run `lorakit ARGS`; it must exit 0. Returns the result (stdout, stderr)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def generate(*args: str):
    """Run `lorakit generate ARGS`; it must exit 0."""
    return ok(["generate", *args])


def pixels(path) -> Any:
    """An image file's RGB pixels, as int16 so that the difference of two stays signed."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def fails(args: list[str], fragment: str):
    """Run `lorakit ARGS`; it must exit 2 with `fragment` on stderr and no traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and fragment in result.stderr, result.stderr
    return result


def sd_pipeline(path):
    """A saved SD 1.x/2.x diffusers folder, loaded with diffusers alone."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path)


def assert_unet_reloads_exactly(result, base):
    """Both adapter files of a trained run, loaded by diffusers into the tiny SD base, make its U-Net draw what the
    trained U-Net draws (each module's own rank and alpha included)."""
    import torch
    from diffusers import StableDiffusionPipeline

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = result.models["unet"].eval()(latents, torch.tensor([300]), encoder_hidden_states=hidden).sample
    for path in (result.adapter, result.diffusers_adapter):
        pipe = StableDiffusionPipeline.from_pretrained(base)
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            got = pipe.unet(latents, torch.tensor([300]), encoder_hidden_states=hidden).sample
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
