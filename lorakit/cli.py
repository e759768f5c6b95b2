"""The `lorakit` command line: each command parses its options, calls one library function, and turns a
LorakitError into one line on stderr and exit code 2 (a traceback only with LORAKIT_DEBUG=1).

Every lorakit module a command needs is imported inside that command, so `lorakit --help` and `prepare`
never load torch (tests/test_cli.py checks it)."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from . import __version__
from .errors import LorakitError
from .prompt_syntax import STRENGTH_LIMIT

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
        _fail(err)
    except ValueError as err:
        # A library's own version gate (transformers or diffusers refusing the installed peft) that the
        # up-front check in _prepare_stack could not foresee: the user can fix it, so it is one line too.
        from .stack import version_mismatch_message

        message = version_mismatch_message(err)
        if message is None:
            raise
        _fail(LorakitError(message))


def _fail(err: LorakitError) -> None:
    if os.environ.get("LORAKIT_DEBUG") == "1":
        raise err
    prefix = "stopped" if hasattr(err, "exit_code") else "error"
    for line in str(err).splitlines() or [type(err).__name__]:
        typer.echo(f"{prefix}: {line}", err=True)
    raise typer.Exit(getattr(err, "exit_code", 2)) from None


def _prepare_stack() -> None:
    """Before a command that loads models (the app callback has quieted the ML libraries): refuse a known-bad
    combination of them, and turn off their progress bars."""
    from .stack import problems

    errors = [p for p in problems() if p.severity == "error"]
    if errors:
        _fail(LorakitError(f"{errors[0].line()} (`lorakit env` lists every problem)"))
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
    from .stack import quiet_third_party

    quiet_third_party()  # before any command imports the ML libraries: their verbosity is fixed at import


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
    verbose: Annotated[bool, typer.Option("--verbose", help="Also print how long each start-up phase took.")] = False,
    strict_memory: Annotated[
        bool, typer.Option(help="Refuse to start when `lorakit plan` says the run will not fit this GPU.")
    ] = False,
) -> None:
    """Train a LoRA adapter as the recipe describes; writes <output.folder>/<output.name>/."""
    from .recipe import load_recipe

    parsed = _run(lambda: load_recipe(recipe, set_ or []))
    _prepare_stack()
    from .train import train as run_training

    log = (lambda _: None) if quiet else (lambda line: typer.echo(line, err=True))
    result = _run(
        lambda: run_training(
            parsed,
            overwrite=overwrite,
            resume=resume,
            quiet=quiet,
            verbose=verbose,
            strict_memory=strict_memory,
            log=log,
        )
    )
    if result.wrote:  # one line per run, not one per torchrun process
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
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (TOML), e.g. recipes/sdxl-character.toml.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe key: section.key=value (repeatable).")
    ] = None,
    vram: Annotated[
        float | None, typer.Option(min=1.0, max=1024.0, callback=_finite, help="The card's memory in GiB, e.g. 12.")
    ] = None,
    gpu: Annotated[str | None, typer.Option(help='A card by name, e.g. "RTX 3060 12GB".')] = None,
    os_: Annotated[str, typer.Option("--os", help="linux or windows (Windows keeps more headroom).")] = "linux",
    arch: Annotated[
        str | None, typer.Option(help="sd15, sd21 or sdxl, when the base's name does not say (a hub id).")
    ] = None,
    fit: Annotated[
        str | None, typer.Option(help="A card size, e.g. 8GB: the cheapest recipe changes that make the run fit.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="With --fit: write the fitted recipe here (TOML).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Peak GPU memory by phase and part, whether it fits a card, the disk it writes and a rough time: before
    training, without loading any weights."""
    import json

    from .recipe import load_recipe

    if out is not None and fit is None:
        raise typer.BadParameter("--out writes the fitted recipe: give --fit too", param_hint="--out")
    if arch is not None and arch not in ("sd15", "sd21", "sdxl"):
        raise typer.BadParameter(f"{arch!r}: use sd15, sd21 or sdxl", param_hint="--arch")
    parsed = _run(lambda: load_recipe(recipe, set_ or []))
    _prepare_stack()
    from .plan import plan as make_plan
    from .plan import plan_lines

    result = _run(lambda: make_plan(parsed, vram=vram, gpu=gpu, system=os_, arch=arch))
    if fit is None:
        typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(plan_lines(result)))
        return
    from .files import atomic_write_text, check_output
    from .plan import fit as fit_recipe
    from .plan import fit_lines, parse_size
    from .recipe import dump_recipe

    found = _run(lambda: fit_recipe(result, parse_size(fit)))
    lines = _run(lambda: fit_lines(result, found))
    if out is not None:
        _run(lambda: check_output(out, [recipe], overwrite))
        atomic_write_text(out, dump_recipe(found.recipe))
        lines.append(f"Wrote {out}")
    typer.echo("\n".join(lines))


@app.command()
def prepare(
    src: Annotated[Path, typer.Argument(help="Folder of photos (searched recursively; never modified).")],
    out: Annotated[Path, typer.Option(help="Dataset folder to write (outside SRC).")] = Path("dataset"),
    trigger: Annotated[
        str, typer.Option(help='Trigger word put once at the front of every caption, e.g. "ohwx person".')
    ] = "",
    caption_suffix: Annotated[
        str,
        typer.Option(
            help='Tags put at the end of every caption that lacks them (kohya\'s caption_suffix), e.g. "photo".'
        ),
    ] = "",
    resolution: Annotated[
        int, typer.Option(min=8, max=4096, help="Training resolution: buckets of about this many pixels squared.")
    ] = 512,
    bucket_step: Annotated[
        int, typer.Option(min=1, max=512, help="Bucket sides are multiples of this (64 for SD).")
    ] = 64,
    max_upscale: Annotated[
        float,
        typer.Option(
            min=1.0, max=16.0, callback=_finite, help="Drop images that would need more upscaling than this."
        ),
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
    caption_lines: Annotated[
        str,
        typer.Option(
            help="A caption file of several lines: join (its lines' tags into one caption), first (its first line, "
            "as kohya reads it), or choices ({line1|line2}: one line per step with data.wildcards, as kohya's "
            "enable_wildcard)."
        ),
    ] = "join",
    class_tokens: Annotated[
        str,
        typer.Option(
            help='Caption of the images without a caption file (kohya\'s class_tokens), e.g. "ohwx man"; not '
            "with --caption-model or --caption-from-filename."
        ),
    ] = "",
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
        int | None, typer.Option(min=1, max=256, help="Worker processes for decoding (default: all cores).")
    ] = None,
    alpha_mask: Annotated[
        bool,
        typer.Option(
            help="Keep each image's transparency as its mask for masked loss (photo.mask.png files always are)."
        ),
    ] = False,
    keep_margin: Annotated[
        bool,
        typer.Option(
            help="Scale each photo to cover its bucket without cropping it to the bucket, so that training with "
            "data.random_crop can move the crop (kohya's random_crop); the bucket is chosen as without it."
        ),
    ] = False,
    mask_model: Annotated[
        str | None,
        typer.Option(
            help="Segmentation model (a CLIPSeg hub id or folder, e.g. CIDAS/clipseg-rd64-refined) that masks the "
            "images without a .mask.png file or transparency, for masked loss."
        ),
    ] = None,
    mask_prompt: Annotated[str, typer.Option(help='What --mask-model looks for: the subject, e.g. "a dog".')] = "",
    mask_threshold: Annotated[
        float,
        typer.Option(min=0.01, max=0.99, callback=_finite, help="Model probability at which a pixel is the subject."),
    ] = 0.4,
    kohya_folders: Annotated[
        bool,
        typer.Option(
            help="kohya's layout: images in a subfolder N_words (e.g. '10_ohwx man') appear N times per epoch, and "
            "those without a caption file are captioned with the words."
        ),
    ] = False,
    resize_filter: Annotated[
        str,
        typer.Option(
            help="How photos are scaled to their buckets (kohya's resize_interpolation): lanczos, bicubic, bilinear, "
            "area (box), nearest."
        ),
    ] = "lanczos",
    kohya_metadata: Annotated[
        Path | None,
        typer.Option(
            help="kohya's fine-tuning metadata (meta_cap.json, or .jsonl: captions and tags by image; kohya's "
            "metadata_file / in_json): only the images it lists are kept, captioned as it says."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Turn a folder of photos into a captioned, bucketed dataset folder for `lorakit train`."""
    from .prepare import PrepareOptions
    from .prepare import prepare as run_prepare

    extensions = tuple(e if e.startswith(".") else f".{e}" for e in caption_ext.split(",") if e.strip())
    options = PrepareOptions(
        trigger=trigger.strip(),
        caption_suffix=caption_suffix.strip(),
        resolution=resolution,
        bucket_step=bucket_step,
        max_upscale=max_upscale,
        background=_colour(background),
        keep_duplicates=keep_duplicates,
        near_threshold=near_threshold,
        caption_extensions=extensions,
        caption_model=caption_model,
        caption_from_filename=caption_from_filename,
        class_tokens=" ".join(class_tokens.split()),
        caption_lines=caption_lines,
        tokenizer=tokenizer,
        strict=strict,
        workers=workers,
        alpha_mask=alpha_mask,
        keep_margin=keep_margin,
        mask_model=mask_model,
        mask_prompt=mask_prompt.strip(),
        mask_threshold=mask_threshold,
        kohya_folders=kohya_folders,
        kohya_metadata=str(kohya_metadata) if kohya_metadata else None,
        resize_filter=resize_filter.strip().lower(),
    )
    if caption_model or tokenizer or mask_model:
        _prepare_stack()
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

        from .files import open_heif_with
        from .prepare.captions import Captioner
        from .prepare.images import to_rgb

        open_heif_with(image)
        try:
            with Image.open(image) as opened:
                picture = to_rgb(opened, (255, 255, 255))
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetError(f"{image}: not a readable image ({err})") from None
        return Captioner(caption_model)(picture)

    _prepare_stack()
    typer.echo(_run(run))


Energy = Annotated[
    float | None,
    typer.Option(
        min=0.01,
        max=1.0,
        help="Per module, the fewest ranks (at most --rank) that keep this share of its energy, e.g. 0.9 "
        "(kohya's dynamic resize); default: --rank everywhere.",
    ),
]
AllowPickle = Annotated[bool, typer.Option(help="Also read .ckpt/.pt/.bin pickles (tensors only, weights_only=True).")]
LbwPresets = Annotated[
    Path | None,
    typer.Option(
        help="The LoRA Block Weight extension's presets file (lbwpresets.txt, NAME:v,v,... lines) for lbw=NAME."
    ),
]
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
    from .convert import convert_adapter

    typer.echo(str(_run(lambda: convert_adapter(file, to, out, overwrite=overwrite, allow_pickle=allow_pickle))))


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="Adapter file (.safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Show an adapter's layout, architecture, ranks, alphas, module counts, update norms and metadata."""
    import json

    from .convert import inspect_adapter, inspection_lines

    info = _run(lambda: inspect_adapter(file, allow_pickle=allow_pickle))
    typer.echo(json.dumps(info, indent=2) if as_json else "\n".join(inspection_lines(info)))


@app.command()
def merge(
    lora: Annotated[
        list[str],
        typer.Option(
            help="Adapter and its strength, FILE[:SCALE], optionally with :lbw=PRESET|v,v,... (a strength per block) "
            "and :te=X / :unet=Y; repeat for several."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Output: a folder or .safetensors checkpoint (with --base), else an adapter.")
    ],
    base: Annotated[
        str | None, typer.Option(help="Base model to merge into (diffusers folder, hub id or .safetensors).")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="For a single-file --base: diffusers folder or hub id of its architecture (SDXL: optional)."
        ),
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format", help="diffusers | single-file (with --base); kohya | diffusers (adapters). Default from --out."
        ),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(min=1, max=4096, help="Merge adapters by SVD to this rank (reports the error); default exact."),
    ] = None,
    energy: Energy = None,
    save_dtype: Annotated[
        str | None,
        typer.Option(
            help="float16, bfloat16 or float32 [default: float16 for an adapter; into a base, the precision the base "
            "stores its weights in]"
        ),
    ] = None,
    lbw_presets: LbwPresets = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Merge adapters into a base model, or several adapters into one (or bake one adapter's lbw= / te= / unet=)."""
    from .merge import merge as run_merge

    if save_dtype not in (None, "float16", "bfloat16", "float32"):
        raise typer.BadParameter(f"{save_dtype!r}: use float16, bfloat16 or float32", param_hint="--save-dtype")
    if energy is not None and (rank is None or base is not None):
        raise typer.BadParameter(
            "chooses ranks for an SVD merge of adapters: give --rank (the largest) and no --base",
            param_hint="--energy",
        )
    _prepare_stack()
    loras, strengths = _lora_arguments(lora)
    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    result = _run(
        lambda: run_merge(
            loras,
            out,
            base=base,
            config=config,
            fmt=format,
            rank=rank,
            energy=energy,
            save_dtype=save_dtype,
            strengths=strengths,
            lbw_presets=str(lbw_presets) if lbw_presets else None,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            log=log,
        )
    )
    typer.echo(str(result.out))


@app.command()
def resize(
    file: Annotated[Path, typer.Argument(help="Adapter file (.safetensors).")],
    rank: Annotated[int, typer.Option(min=1, max=4096, help="New rank (with --energy: the largest rank).")],
    out: Annotated[Path | None, typer.Option(help="Output file (default: FILE.rankR.safetensors).")] = None,
    energy: Energy = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Shrink (or re-factor) an adapter to another rank by SVD; reports the energy it keeps."""
    from .merge import resize as run_resize

    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    path, _ = _run(
        lambda: run_resize(file, rank, out, energy=energy, overwrite=overwrite, allow_pickle=allow_pickle, log=log)
    )
    typer.echo(str(path))


@app.command()
def extract(
    tuned: Annotated[
        str, typer.Argument(help="The fine-tuned model: a diffusers folder, hub id or .safetensors checkpoint.")
    ],
    base: Annotated[str, typer.Option(help="The model TUNED was fine-tuned from (the same forms).")],
    out: Annotated[Path, typer.Option(help="The adapter file to write (.safetensors).")],
    rank: Annotated[
        int, typer.Option(min=1, max=4096, help="Rank of the adapter (alpha = rank; with --energy: the largest).")
    ],
    energy: Energy = None,
    conv_rank: Annotated[
        int | None,
        typer.Option(
            min=1, max=4096, help="Rank of the 3x3 convolutions with --targets transformer+conv [default: --rank]."
        ),
    ] = None,
    targets: Annotated[
        str,
        typer.Option(help="Which weights to extract: transformer (kohya's default), attention, or transformer+conv."),
    ] = "transformer",
    config: Annotated[
        str | None,
        typer.Option(help="For single-file SD 1.x/2.x models: a diffusers folder or hub id of their architecture."),
    ] = None,
    format: Annotated[str, typer.Option("--format", help="kohya (loads everywhere) or diffusers.")] = "kohya",
    save_dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32.")] = "float16",
    min_diff: Annotated[
        float,
        typer.Option(min=0.0, help="A module whose largest weight change is at most this gets no adapter."),
    ] = 0.0,
    device: Annotated[
        str | None, typer.Option(help="Where to run the SVDs: cpu, cuda or cuda:N [default: cuda when present].")
    ] = None,
    overwrite: Overwrite = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Extract a LoRA from a fine-tuned model: the change from --base, by SVD per module; reports what it keeps."""
    from typing import get_args

    from .recipe.sections import TargetPreset

    if targets not in get_args(TargetPreset):
        raise typer.BadParameter(f"{targets!r}: use {', '.join(get_args(TargetPreset))}", param_hint="--targets")
    if conv_rank is not None and targets != "transformer+conv":
        raise typer.BadParameter(
            "applies to 3x3 convolutions, which only --targets transformer+conv extracts", param_hint="--conv-rank"
        )
    if format not in ("kohya", "diffusers"):
        raise typer.BadParameter(f"{format!r}: use kohya or diffusers", param_hint="--format")
    if save_dtype not in ("float16", "bfloat16", "float32"):
        raise typer.BadParameter(f"{save_dtype!r}: use float16, bfloat16 or float32", param_hint="--save-dtype")
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise typer.BadParameter(f"{device!r}: use cpu, cuda or cuda:N", param_hint="--device")
    _prepare_stack()
    from .extract import extract as run_extract

    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    result = _run(
        lambda: run_extract(
            tuned,
            base,
            out,
            rank=rank,
            energy=energy,
            conv_rank=conv_rank,
            targets=targets,
            config=config,
            fmt=format,
            save_dtype=save_dtype,
            min_diff=min_diff,
            device=device,
            overwrite=overwrite,
            quiet=quiet,
            log=log,
        )
    )
    typer.echo(str(result.out))


SEED_MAX = 2**32 - 1  # seeds are 32-bit, as in the recipe (train.seed) and kohya's tools
SCALE_LIMIT = STRENGTH_LIMIT  # adapter strengths (--lora FILE:SCALE, --compare-scales), as lbw= / te= / unet= take
SIZE_LIMIT = 4096  # pixels a side for generate --size


def _finite(value: float | None) -> float | None:
    """Option callback: NaN and infinity are not numbers a user means."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value}: give a finite number")
    return value


def _usable_scale(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= SCALE_LIMIT


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = (math.nan,)
    if not all(_usable_scale(v) for v in values):
        raise typer.BadParameter(
            f"{text!r}: give comma-separated numbers between -{SCALE_LIMIT:g} and {SCALE_LIMIT:g} such as 0,0.5,1",
            param_hint=option,
        )
    return values


def _file_and_word(text: str) -> tuple[str, str | None]:
    """`FILE[:WORD]`: the word after the last ':' when it is one (a Windows drive's ':' is not followed by one)."""
    file, sep, word = text.rpartition(":")
    return (file, word) if sep and file and re.fullmatch(r"\w+", word) else (text, None)


def _lora_arguments(texts: list[str] | None, option: str = "--lora") -> tuple[list[tuple[str, float]], tuple]:
    """`FILE[:SCALE][:lbw=...][:te=X][:unet=Y]` arguments: (FILE, SCALE) each, every strength a finite number within
    +-SCALE_LIMIT, and the Strengths of each."""
    from .bake import path_and_scale
    from .block_weight import split_strengths

    loras, strengths = [], []
    for text in texts or []:
        try:
            path, scale, drawn_with = split_strengths(text, path_and_scale, option)
        except ValueError as err:
            raise typer.BadParameter(str(err).removeprefix(f"{option} "), param_hint=option) from None
        if not _usable_scale(scale):
            raise typer.BadParameter(
                f"{text!r}: the strength after ':' must be a number between -{SCALE_LIMIT:g} and {SCALE_LIMIT:g}",
                param_hint=option,
            )
        loras.append((path, scale))
        strengths.append(drawn_with)
    return loras, tuple(strengths)


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", text.strip())
    if not match or max(int(match.group(1)), int(match.group(2))) > SIZE_LIMIT:
        raise typer.BadParameter(
            f"{text!r}: give WIDTHxHEIGHT up to {SIZE_LIMIT} a side, such as 512x512", param_hint="--size"
        )
    return int(match.group(1)), int(match.group(2))


@app.command("from-kohya")
def from_kohya(
    config: Annotated[
        Path, typer.Argument(help="A kohya sd-scripts training config (.toml, as --config_file reads).")
    ],
    out: Annotated[Path, typer.Option(help="The recipe to write.")] = Path("recipe.toml"),
    dataset_config: Annotated[
        Path | None,
        typer.Option(
            help="kohya's dataset config (.toml, as --dataset_config reads), when the training config does not "
            "name it: each subset becomes a `lorakit prepare` line and a data.folder entry, is_reg ones [prior]."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Turn a kohya sd-scripts config into a lorakit recipe, accounting for every setting."""
    from .kohya_config import from_kohya as convert

    result, path = _run(lambda: convert(config, out, dataset_config=dataset_config, overwrite=overwrite))
    typer.echo(f"Wrote {path}: {len(result.mapped)} of the {result.read} kohya settings mapped to recipe keys")
    if result.not_needed:
        typer.echo(f"  not needed in lorakit ({len(result.not_needed)}): {', '.join(result.not_needed)}")
    if result.changed:
        typer.echo(f"  carried over with a change ({len(result.changed)}):")
        for line in result.changed:
            typer.echo(f"    {line}")
    if result.unsupported:
        typer.echo(f"  not carried over ({len(result.unsupported)}):")
        for line in result.unsupported:
            typer.echo(f"    {line}")
    for note in result.notes:
        typer.echo(f"Prepare the photos first: {note}")
    typer.echo(f"Then: lorakit plan {path} && lorakit train {path}")


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    out: Annotated[Path, typer.Option(help="Folder for the images and grid.png.")],
    base: Annotated[
        str | None,
        typer.Option(
            help="Base model: diffusers folder, hub id or .safetensors "
            "(default: the base of a run folder given as --lora)."
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            help="Adapter FILE[:SCALE] (kohya or diffusers layout) or a run folder, optionally with "
            ":lbw=PRESET|v,v,... (a strength per block), :te=X / :unet=Y and :start=N / :stop=N (the U-Net part over "
            "those denoising steps alone); repeat for several."
        ),
    ] = None,
    lbw_presets: LbwPresets = None,
    lora_dir: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder (and its subfolders) where <lora:NAME:0.8> tags in the prompts find NAME.safetensors, like "
            "the webuis' models/Lora; repeat for several."
        ),
    ] = None,
    n: Annotated[
        int, typer.Option("-n", "--count", min=1, max=1000, help="Images per prompt (seeds seed, seed+1, ...).")
    ] = 1,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the first image of each prompt.")] = 0,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="Denoising steps.")] = 30,
    guidance: Annotated[
        float, typer.Option(min=0.0, max=100.0, callback=_finite, help="Classifier-free guidance scale (CFG).")
    ] = 7.0,
    sampler: Annotated[str, typer.Option(help="euler, euler_a, dpmpp_2m or ddim.")] = "euler",
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT, multiples of 8.")] = "512x512",
    negative: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    compare_scales: Annotated[
        str | None,
        typer.Option(help="Render every image at these adapter strengths, e.g. 0,0.5,1, into one labelled grid."),
    ] = None,
    compare_saves: Annotated[
        bool,
        typer.Option(
            "--compare-saves",
            help="With a run folder as --lora: render every image with each adapter the run saved (every "
            "checkpoint's, then the final one) into one labelled grid, to pick the best epoch.",
        ),
    ] = False,
    compare_lbw: Annotated[
        list[str] | None,
        typer.Option(
            help="Render every image with the one --lora adapter at each of these block vectors (lbw= presets or "
            "values, as LoRA Block Weight's), into one labelled grid; repeat for each column."
        ),
    ] = None,
    init: Annotated[Path | None, typer.Option(help="img2img: start from this image.")] = None,
    strength: Annotated[
        float, typer.Option(callback=_finite, help="img2img: how much of the init image is re-drawn, (0, 1].")
    ] = 0.5,
    upscale: Annotated[
        float, typer.Option(min=1.0, max=4.0, callback=_finite, help="Hires: enlarge by this factor and re-denoise.")
    ] = 1.0,
    hires_strength: Annotated[
        float, typer.Option(callback=_finite, help="Hires: strength of the re-denoising pass, (0, 1].")
    ] = 0.35,
    guidance_rescale: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, callback=_finite, help="CFG rescale (default 0.7 for v-prediction bases, else 0)."
        ),
    ] = None,
    clip_skip: Annotated[
        int | None,
        typer.Option(min=1, max=32, help="Use the N-th last text-encoder layer (default: the run folder's, else 1)."),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="For a single-file --base: its diffusers config folder or hub id (SDXL: optional)."),
    ] = None,
    embedding: Annotated[
        list[str] | None,
        typer.Option(
            help="A textual-inversion file FILE[:WORD] (.safetensors, e.g. a negative embedding), called by writing "
            "its word (default: its file name) in a prompt or --negative; repeat for several."
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16.")
    ] = "auto",
    allow_pickle: AllowPickle = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Render images with a base model and adapters: txt2img, img2img, hires, grids comparing strengths or saves."""
    from .generate import GenerateOptions
    from .generate import generate as run_generate
    from .render import RenderSettings

    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise typer.BadParameter(f"{dtype!r}: use auto, float32, float16 or bfloat16", param_hint="--dtype")
    width, height = _size(size)
    loras, lora_strengths = _lora_arguments(lora)
    settings = RenderSettings(
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        negative_prompt=negative,
        sampler=sampler,
    )
    options = GenerateOptions(
        base=base,
        config=config,
        loras=tuple(loras),
        lora_strengths=lora_strengths,
        lbw_presets=str(lbw_presets) if lbw_presets else None,
        count=n,
        seed=seed,
        settings=settings,
        clip_skip=clip_skip,
        compare_scales=_floats(compare_scales, "--compare-scales") if compare_scales else (),
        compare_saves=compare_saves,
        compare_lbw=tuple(compare_lbw or ()),
        init=str(init) if init else None,
        strength=strength,
        upscale=upscale,
        hires_strength=hires_strength,
        guidance_rescale=guidance_rescale,
        dtype=dtype,
        allow_pickle=allow_pickle,
        embeddings=tuple(_file_and_word(text) for text in embedding or []),
        lora_dirs=tuple(str(folder) for folder in lora_dir or []),
    )
    _prepare_stack()
    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    result = _run(lambda: run_generate(prompt, out, options, quiet=quiet, log=log))
    typer.echo(str(result.grid))


toy_app = typer.Typer(
    help="The toy world: a tiny base model pretrained on the CPU, for demos and benchmarks.", no_args_is_help=True
)
app.add_typer(toy_app, name="toy")


@toy_app.command("build")
def toy_build(
    out: Annotated[
        Path | None, typer.Option(help="Folder of the toy base (default ~/.cache/lorakit/toy-base-v2).")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the whole build.")] = 0,
    vae_steps: Annotated[int, typer.Option(min=1, max=1_000_000, help="VAE training steps.")] = 800,
    unet_steps: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="U-Net and text-encoder training steps.")
    ] = 1200,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Pretrain (or reuse) the toy base model: about 8 minutes on 2 CPU cores, once per machine."""
    _prepare_stack()
    from .toy.build import build_toy_base

    log = lambda line: typer.echo(line, err=True)  # noqa: E731
    typer.echo(
        str(
            _run(
                lambda: build_toy_base(
                    out, seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, quiet=quiet, log=log
                )
            )
        )
    )


@toy_app.command("pairs")
def toy_pairs(
    out: Annotated[Path, typer.Argument(help="Folder to write OUT/red and OUT/blue into (they must not exist yet).")],
    count: Annotated[int, typer.Option(min=1, max=1000, help="Scenes (photos per folder).")] = 12,
) -> None:
    """An image slider's photos on the toy world: the same scenes with a red ball (OUT/red) and a blue one
    (OUT/blue), captioned alike without the colour."""
    from .toy import write_slider_pairs

    def write() -> tuple[Path, Path]:
        for name in ("red", "blue"):
            if (out / name).exists():
                raise LorakitError(f"{out / name}: exists; give an OUT folder without red/ and blue/ in it")
        return write_slider_pairs(out, count=count)

    for folder in _run(write):
        typer.echo(str(folder))


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="Folder for the demo's photos, dataset, run, grid and merged model.")
    ] = Path("demo"),
    toy_base: Annotated[
        Path | None, typer.Option(help="Toy base folder (default: build or reuse the cached one).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, max=1_000_000, help="Training steps (default: the toy recipe's).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """The whole path on the toy world: build the base, prepare photos of a new concept, train, compare, merge."""
    _prepare_stack()
    from .demo import run_demo

    log = (lambda _: None) if quiet else (lambda line: typer.echo(line, err=True))
    result = _run(lambda: run_demo(out, toy_base=toy_base, steps=steps, quiet=quiet, log=log))
    typer.echo(str(result))


@app.command()
def env(
    json_: Annotated[bool, typer.Option("--json", help="Print the facts as JSON (for bug reports).")] = False,
) -> None:
    """Print versions, devices, whether 8-bit optimizers work here, and any known-bad package combination."""
    from .env import collect, format_report

    facts = collect()
    if json_:
        import json

        typer.echo(json.dumps(facts, indent=2))
    else:
        typer.echo(format_report(facts))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
