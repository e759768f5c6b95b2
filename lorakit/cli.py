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


def _colour(value: str) -> tuple[int, int, int]:
    from PIL import ImageColor

    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a colour; use a name such as white or a hex code such as #808080"
        ) from None


@app.command()
def prepare(
    src: Annotated[Path, typer.Argument(help="Folder of photos (searched recursively; never modified).")],
    out: Annotated[Path, typer.Option(help="Dataset folder to write (outside SRC).")] = Path("dataset"),
    trigger: Annotated[
        str, typer.Option(help='Trigger word put once at the front of every caption, e.g. "ohwx person".')
    ] = "",
    resolution: Annotated[
        int, typer.Option(min=64, help="Training resolution: buckets of about this many pixels squared.")
    ] = 512,
    max_upscale: Annotated[
        float, typer.Option(min=1.0, help="Drop images that would need more upscaling than this.")
    ] = 2.0,
    background: Annotated[str, typer.Option(help="Colour behind transparent pixels.")] = "white",
    keep_duplicates: Annotated[
        bool, typer.Option(help="Keep exact and near duplicates (they are reported either way).")
    ] = False,
    near_threshold: Annotated[
        int, typer.Option(min=0, max=64, help="Near duplicate: at most this many of 64 perceptual-hash bits differ.")
    ] = 6,
    caption_ext: Annotated[
        str, typer.Option(help="Caption file extensions beside each image, in order of preference.")
    ] = ".txt,.caption",
    caption_model: Annotated[
        str | None,
        typer.Option(
            help="Image-to-text model (hub id or folder, e.g. Salesforce/blip-image-captioning-base) "
            "for images without a caption file."
        ),
    ] = None,
    caption_from_filename: Annotated[
        bool, typer.Option(help="Use the file name as caption when there is no caption file or model.")
    ] = False,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="CLIP tokenizer (folder, diffusers model folder or hub id) to count caption tokens."),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            help="Fail (exit 2) on any unreadable, truncated, empty or oversized image instead of skipping it."
        ),
    ] = False,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes for decoding (default: all cores).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Turn a folder of photos into a captioned, bucketed dataset folder for `lorakit train`."""
    from .prepare import PrepareOptions
    from .prepare import prepare as run_prepare

    extensions = tuple(e if e.startswith(".") else f".{e}" for e in caption_ext.split(",") if e.strip())
    options = PrepareOptions(
        trigger=trigger.strip(),
        resolution=resolution,
        max_upscale=max_upscale,
        background=_colour(background),
        keep_duplicates=keep_duplicates,
        near_threshold=near_threshold,
        caption_extensions=extensions,
        caption_model=caption_model,
        caption_from_filename=caption_from_filename,
        tokenizer=tokenizer,
        strict=strict,
        workers=workers,
    )
    if caption_model or tokenizer:
        _quiet_libraries()
    _run(lambda: run_prepare(src, out, options, quiet=quiet, log=typer.echo))


@app.command()
def caption(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    caption_model: Annotated[str, typer.Option(help="Image-to-text model (hub id or folder), as for `prepare`.")],
) -> None:
    """Print the caption the captioning model gives one image: what the model sees in it."""
    from .errors import DatasetError

    def run() -> str:
        from PIL import Image, UnidentifiedImageError

        from .prepare.captions import Captioner
        from .prepare.images import to_rgb

        try:
            with Image.open(image) as opened:
                picture = to_rgb(opened, (255, 255, 255))
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetError(f"{image}: not a readable image ({err})") from None
        return Captioner(caption_model)(picture)

    _quiet_libraries()
    typer.echo(_run(run))


AllowPickle = Annotated[bool, typer.Option(help="Also read .ckpt/.pt/.bin pickles (tensors only, weights_only=True).")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output.")]


@app.command()
def convert(
    file: Annotated[Path, typer.Argument(help="Adapter file (.safetensors), kohya or diffusers layout.")],
    to: Annotated[str, typer.Option(help="Target layout: kohya (A1111/Forge/ComfyUI/diffusers) or diffusers.")],
    out: Annotated[Path | None, typer.Option(help="Output file (default: beside FILE).")] = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Convert an adapter between the kohya and diffusers layouts (weights unchanged, metadata kept)."""
    if to not in ("kohya", "diffusers"):
        raise typer.BadParameter(f"{to!r}: use kohya or diffusers", param_hint="--to")
    from .formats.tools import convert_adapter

    typer.echo(str(_run(lambda: convert_adapter(file, to, out, overwrite=overwrite, allow_pickle=allow_pickle))))


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="Adapter file (.safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Show an adapter's layout, architecture, ranks, alphas, module counts, update norms and metadata."""
    import json

    from .formats.tools import inspect_adapter, inspection_lines

    info = _run(lambda: inspect_adapter(file, allow_pickle=allow_pickle))
    typer.echo(json.dumps(info, indent=2) if as_json else "\n".join(inspection_lines(info)))


@app.command()
def merge(
    lora: Annotated[list[str], typer.Option(help="Adapter and its strength, FILE[:SCALE]; repeat for several.")],
    out: Annotated[
        Path, typer.Option(help="Output: a folder or .safetensors checkpoint (with --base), else an adapter.")
    ],
    base: Annotated[
        str | None, typer.Option(help="Base model to merge into (diffusers folder, hub id or .safetensors).")
    ] = None,
    config: Annotated[
        str | None, typer.Option(help="For a single-file --base: diffusers folder or hub id of its architecture.")
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format", help="diffusers | single-file (with --base); kohya | diffusers (adapters). Default from --out."
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option(min=1, help="Merge adapters by SVD to this rank (reports the error); default exact.")
    ] = None,
    save_dtype: Annotated[
        str, typer.Option(help="dtype of a merged adapter: float16, bfloat16 or float32.")
    ] = "float16",
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Merge adapters into a base model, or several adapters into one."""
    from .merge import merge as run_merge
    from .merge import parse_lora_argument

    if save_dtype not in ("float16", "bfloat16", "float32"):
        raise typer.BadParameter(f"{save_dtype!r}: use float16, bfloat16 or float32", param_hint="--save-dtype")
    _quiet_libraries()
    loras = [parse_lora_argument(text) for text in lora]
    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    result = _run(
        lambda: run_merge(
            loras,
            out,
            base=base,
            config=config,
            fmt=format,
            rank=rank,
            save_dtype=save_dtype,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            log=log,
        )
    )
    typer.echo(str(result.out))


@app.command()
def resize(
    file: Annotated[Path, typer.Argument(help="Adapter file (.safetensors).")],
    rank: Annotated[int, typer.Option(min=1, help="New rank.")],
    out: Annotated[Path | None, typer.Option(help="Output file (default: FILE.rankR.safetensors).")] = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Shrink (or re-factor) an adapter to another rank by SVD; reports the energy it keeps."""
    from .merge import resize as run_resize

    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    path, _ = _run(lambda: run_resize(file, rank, out, overwrite=overwrite, allow_pickle=allow_pickle, log=log))
    typer.echo(str(path))


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
