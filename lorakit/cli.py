"""The `lorakit` command line: each command parses its options, calls one library function, and turns a
LorakitError into one line on stderr and exit code 2 (a traceback only with LORAKIT_DEBUG=1)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from . import __version__
from .errors import LorakitError

app = typer.Typer(
    name="lorakit",
    help="LoRA fine-tuning for personal Stable Diffusion models: prepare photos, train, merge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Run a library call; a LorakitError becomes its message on stderr and exit code 2."""
    try:
        return action()
    except LorakitError as err:
        if os.environ.get("LORAKIT_DEBUG") == "1":
            raise
        for line in str(err).splitlines() or [type(err).__name__]:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from None


def _quiet_libraries() -> None:
    """Keep the ML libraries' own progress bars and notices out of lorakit's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """LoRA fine-tuning for personal Stable Diffusion models."""


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (TOML), e.g. recipes/character.toml.")],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a recipe key: section.key=value (repeatable), e.g. --set train.max_steps=500."
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue an interrupted run: 'latest' or a checkpoints/step-NNNNNN folder of its run."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the result.")] = False,
) -> None:
    """Train a LoRA adapter as the recipe describes; writes <output.folder>/<output.name>/."""
    from .recipe import load_recipe

    parsed = _run(lambda: load_recipe(recipe, set_ or []))
    _quiet_libraries()
    from .train import train as run_training

    log = (lambda _: None) if quiet else (lambda line: typer.echo(line, err=True))
    result = _run(lambda: run_training(parsed, overwrite=overwrite, resume=resume, quiet=quiet, log=log))
    typer.echo(str(result.adapter))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's base model, dataset and run.")] = Path("demo"),
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 60,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier demo run in OUT.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the result.")] = False,
) -> None:
    """Build a tiny offline base model and example photos, train an adapter on them, and write it."""
    _quiet_libraries()
    from .demo import run_demo

    log = (lambda _: None) if quiet else (lambda line: typer.echo(line, err=True))
    result = _run(lambda: run_demo(out, steps=steps, overwrite=overwrite, quiet=quiet, log=log))
    typer.echo(str(result.adapter))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
