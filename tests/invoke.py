"""Driving the CLI in-process, as a user would, for the tests of several commands."""

from __future__ import annotations

from typer.testing import CliRunner

from lorakit.cli import app

runner = CliRunner()


def ok(args: list[str]):
    """Run `lorakit ARGS`; it must exit 0. Returns the result (stdout, stderr)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


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
