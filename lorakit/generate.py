"""`lorakit generate`: txt2img, img2img and hires with adapters (files or run folders), grids to compare scales or
the adapters a run saved.

The drawing itself is `lorakit.render`, which training's samples and class images also use.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .adapters import lycoris_kind
from .bake import merge_files
from .block_weight import Strengths, read_presets, weighted_state
from .checkpoint import RunPaths
from .embedding import EMBEDDINGS_FOLDER, load_embedding, read_embedding, replace_embedding
from .errors import AdapterError, LorakitError
from .files import file_sha256, open_heif_with
from .formats.metadata import a1111_short_hash
from .formats.read import PICKLE_SUFFIXES, read_adapter_file
from .lycoris import KIND_NAMES
from .models import detect_family, load_pipeline
from .progress import progress_bar
from .prompt_syntax import lora_tags, network_tag, scale_lora_tags
from .recipe import load_recipe
from .render import (
    SAMPLER_LABELS,
    SAMPLERS,
    LoadedAdapter,
    RenderSettings,
    StepRanges,
    a1111_parameters,
    apply_adapters,
    img2img,
    make_grid,
    pipeline_models,
    render,
    save_png,
    set_sampler,
    set_scales,
    steps_run,
)
from .timestep_rank import schedule_from_metadata
from .trigger import with_trigger


@dataclass
class RunDefaults:
    """What a run folder passed as --lora contributes: its base (with the adapters it merged into it), trigger word
    and clip skip."""

    base: str | None = None
    config: str | None = None
    trigger: str = ""
    clip_skip: int = 1
    merged: tuple[str, ...] = ()  # the run's model.merged_adapters, part of the base it trained on
    embedding: Path | None = None  # the run's [embedding] file (its stem is the word)


def resolve_adapters(
    loras: list[tuple[str, float]],
    allow_pickle: bool = False,
    strengths: tuple[Strengths, ...] = (),
    presets: dict[str, str] | None = None,
) -> tuple[list[LoadedAdapter], RunDefaults]:
    """Read every `--lora` (a file, or a run folder whose adapter and recipe are used), each with its `strengths`
    (by position; none given: plain), whose `lbw=` is checked against the file's architecture here, before any
    model is loaded."""

    adapters, defaults = [], RunDefaults()
    for index, (text, scale) in enumerate(loras):
        path = Path(text).expanduser()
        if path.is_dir():
            recipe_path = RunPaths(path, "").recipe
            if not recipe_path.is_file():
                raise AdapterError(f"--lora {text}: a folder but not a run folder (no recipe.resolved.toml)")
            recipe = load_recipe(recipe_path)
            run = RunPaths(path, recipe.output.name)
            path = run.adapter()
            if defaults.base is None:
                model = recipe.model
                merged = tuple(model.merged_adapters)
                embedding = run.embedding(recipe.embedding.token) if recipe.embedding else None
                defaults = RunDefaults(
                    model.base, model.config, recipe.data.trigger, model.clip_skip, merged, embedding
                )
            if recipe.embedding is not None and recipe.embedding.only:  # textual inversion: no adapter to load
                continue
        adapter = read_adapter_file(path, allow_pickle=allow_pickle)
        sha = file_sha256(path)
        short = a1111_short_hash(path) if path.suffix.lower() == ".safetensors" else sha[:12]
        name = re.sub(r"[^A-Za-z0-9_-]", "_", path.name.split(".")[0])
        schedule = schedule_from_metadata(adapter.metadata, str(path))
        steps = adapter.metadata.get("ss_steps", "")
        drawn_with = strengths[index] if index < len(strengths) else Strengths()
        if not drawn_with.plain:  # the whole check, on the adapter's own blocks (the base's come once it is loaded)
            weighted_state(adapter.state, drawn_with, str(path), adapter.family, presets=presets)
        if drawn_with.stepped and lycoris_kind(adapter.state) is not None:
            raise AdapterError(
                f"{path}: start= / stop= switch a LoRA's U-Net part on and off between steps; a "
                f"{KIND_NAMES[lycoris_kind(adapter.state)]} adapter is written into the weights, so drop them"
            )
        adapters.append(
            LoadedAdapter(
                f"{name}_{len(adapters)}",
                path,
                scale,
                adapter.state,
                sha,
                short,
                schedule,
                int(steps) if steps.isdigit() else 0,
                drawn_with,
                adapter.family,
            )
        )
    return adapters, defaults


def _weighted(adapter: LoadedAdapter, family: str, pipe: Any, presets: dict[str, str] | None) -> LoadedAdapter:
    """The adapter with its te= / unet= / lbw= strengths baked into its factors, by the blocks of the base's U-Net."""
    if adapter.strengths.plain:
        return adapter
    state = weighted_state(
        adapter.state,
        adapter.strengths,
        str(adapter.path),
        family,
        unet_config=dict(pipe.unet.config),
        presets=presets,
    )
    return replace(adapter, state=state)


@dataclass(frozen=True)
class GenerateOptions:
    base: str | None = None
    config: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    lora_strengths: tuple[Strengths, ...] = ()  # per --lora, by position: its te= / unet= / lbw= (none: plain)
    lbw_presets: str | None = None  # --lbw-presets: the LoRA Block Weight extension's presets file
    count: int = 1
    seed: int = 0
    settings: RenderSettings = RenderSettings()
    compare_scales: tuple[float, ...] = ()
    compare_saves: bool = False  # a column per adapter the run folder given as --lora saved
    compare_lbw: tuple[str, ...] = ()  # a column per lbw= block vector (or preset) of the one --lora adapter
    init: str | None = None
    strength: float = 0.5
    upscale: float = 1.0
    hires_strength: float = 0.35
    guidance_rescale: float | None = None
    dtype: str = "auto"
    allow_pickle: bool = False
    embeddings: tuple[tuple[str, str | None], ...] = ()  # --embedding FILE[:WORD]: textual-inversion files
    clip_skip: int | None = None  # None: the run folder's, else 1
    lora_dirs: tuple[str, ...] = ()  # --lora-dir: where the prompts' `<lora:NAME:W>` tags are looked up


@dataclass
class GenerateResult:
    images: list[Path] = field(default_factory=list)
    grid: Path | None = None


def _device_and_dtype(requested: str, log) -> tuple[str, str]:
    """(device, dtype name) a render runs in: float16 on CUDA and float32 on a CPU unless `--dtype` says."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        return ("cuda", "float16") if cuda else ("cpu", "float32")
    if requested == "float16" and not cuda:
        log("--dtype float16 does not run on a CPU; generating in bfloat16 instead")
        requested = "bfloat16"
    return ("cuda" if cuda else "cpu"), requested


def effective_clip_skip(requested: int | None, from_run: int) -> int:
    """`--clip-skip` when given (1 included, which turns a run's clip skip off), else the run folder's."""
    return from_run if requested is None else requested


def check_size(width: int, height: int) -> None:
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise LorakitError(f"--size {width}x{height}: width and height must be positive multiples of 8, e.g. 512x512")


def generate(
    prompts: list[str], out: str | Path, options: GenerateOptions, *, quiet: bool = False, log=print
) -> GenerateResult:
    """Render `count` images per prompt (and per scale in compare mode) into `out`, with a grid."""

    settings = options.settings
    check_size(settings.width, settings.height)
    if (tag := network_tag(settings.negative_prompt)) is not None:
        raise LorakitError(
            f"--negative holds the webui tag {tag}, which lorakit would encode as words; adapters come from --lora "
            "or from <lora:NAME:W> tags in the prompts"
        )
    tagged = TaggedPrompts.read(prompts, options.lora_dirs)
    presets = read_presets(options.lbw_presets) if options.lbw_presets else None
    if settings.sampler not in SAMPLERS:
        raise LorakitError(f"--sampler {settings.sampler!r}: use one of {', '.join(SAMPLERS)}")
    for name, value in (("--strength", options.strength), ("--hires-strength", options.hires_strength)):
        if not 0 < value <= 1:
            raise LorakitError(f"{name} {value:g}: must be in (0, 1]")
    for used, name, value in (
        (options.init, "--strength", options.strength),
        (options.upscale > 1, "--hires-strength", options.hires_strength),
    ):
        if used and steps_run(settings.steps, value) < 1:
            raise LorakitError(
                f"{name} {value:g} with --steps {settings.steps} runs no denoising step; use at least "
                f"{1 / settings.steps:.3f} or more steps"
            )
    chosen = [name for name in COMPARISONS if getattr(options, name)]
    if len(chosen) > 1:
        named = " and ".join(f"--{name.replace('_', '-')}" for name in chosen)
        raise LorakitError(f"{named}: each sets the grid's columns; choose one")
    init_image = _open_init(options.init, settings) if options.init else None
    adapters, defaults = resolve_adapters(list(options.loras), options.allow_pickle, options.lora_strengths, presets)
    tag_adapters = tagged.load(options.allow_pickle, presets)
    columns = [Column(f"scale {m:g}", f"-x{m:g}", m) for m in options.compare_scales] or [Column("", "", 1.0)]
    if options.compare_saves:
        saves = _saves(list(options.loras), adapters, options.allow_pickle)
        adapters += [save.adapter for save in saves[:-1] if save.adapter]  # the final one is the run folder's own
        drawn = [save.adapter for save in saves if save.adapter]
        columns = [
            Column(
                save.label,
                "-" + re.sub(r"[^a-z0-9]+", "", save.label.split(" (")[0]),
                1.0,
                {adapter.name: float(adapter is save.adapter) for adapter in drawn},
                save.embedding,
            )
            for save in saves
        ]
    if options.compare_lbw:
        adapters, columns = _block_columns(adapters, options.compare_lbw, presets)
    base = options.base or defaults.base
    if base is None:
        raise LorakitError(
            "--base: give the base model (a diffusers folder, hub id or .safetensors), or a run folder as --lora"
        )
    device, dtype = _device_and_dtype(options.dtype, log)
    config = options.config or (defaults.config if not options.base else None)
    pipe = load_pipeline(base, config=config, dtype=dtype, log=log, as_options=options.base is not None)
    models = pipeline_models(pipe)
    family = detect_family(models, dict(pipe.unet.config))
    if defaults.merged and not options.base:  # the base the run trained on had these in its weights
        said = merge_files(list(defaults.merged), models, family, "the run's model.merged_adapters")
        log(f"The run's model.merged_adapters: {said}")
    adapters, tag_adapters = (
        [_weighted(a, family, pipe, presets) for a in group] for group in (adapters, tag_adapters)
    )
    apply_adapters(pipe, adapters + tag_adapters)  # checks the adapters against the base first
    stepped = {a.name: (a.strengths.start, a.strengths.stop) for a in adapters + tag_adapters if a.strengths.stepped}
    pipe.lorakit_steps = StepRanges(stepped) if stepped else None
    run_word = None
    if defaults.embedding is not None:
        word = run_word = load_embedding(pipe, defaults.embedding)
        log(f"The run's embedding: {defaults.embedding}, the word {word!r}")
    for file, word in options.embeddings:
        word = load_embedding(pipe, Path(file).expanduser(), word)
        log(f"Embedding {file}: the word {word!r} in a prompt or --negative calls it")
    pipe.to(device, getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    set_sampler(pipe, settings.sampler)
    rescale = options.guidance_rescale
    if rescale is None:
        rescale = 0.7 if pipe.scheduler.config.prediction_type == "v_prediction" else 0.0
    clip_skip = effective_clip_skip(options.clip_skip, defaults.clip_skip)
    settings = replace(settings, guidance_rescale=rescale, clip_skip=clip_skip)
    triggered = [_triggered(p, plain, defaults.trigger) for p, plain in zip(prompts, tagged.encoded, strict=True)]
    encoded, written = [e for e, _ in triggered], [w for _, w in triggered]
    rows = [(p, options.seed + i) for p in written for i in range(options.count)]
    prompt_of_row = [index for index in range(len(written)) for _ in range(options.count)]
    groups = tagged.groups(prompt_of_row)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    result, images = GenerateResult(), []
    total = len(rows) * len(columns) * (2 if options.upscale > 1 else 1)
    with progress_bar("Generating", total, quiet=quiet) as bar:
        for index, column in enumerate(columns):
            if column.embedding is not None and run_word is not None:  # a save of a run that trains an [embedding]
                replace_embedding(pipe, column.embedding, run_word)
            drawn: list[Any] = [None] * len(rows)
            for strengths, members in groups:  # the rows whose tags ask for the same strengths, drawn together
                set_scales(pipe, adapters + tag_adapters, column.multiplier, {**column.factors, **strengths})
                members_rows = [(encoded[prompt_of_row[i]], rows[i][1]) for i in members]
                images_drawn = _render_rows(pipe, members_rows, settings, options, init_image, bar.advance)
                for i, image in zip(members, images_drawn, strict=True):
                    drawn[i] = image
            for row, ((prompt, seed), image) in enumerate(zip(rows, drawn, strict=True)):
                path = out / f"{len(images):03d}-seed{seed}{column.suffix}.png"
                in_row = [(a, groups.strength(row, a) * column.multiplier) for a in tag_adapters]
                parameters = _parameters(prompt, seed, image.size, settings, options, adapters, column, in_row)
                save_png(image, path, parameters)
                result.images.append(path)
                images.append((index, prompt, seed, image))
    result.grid = _write_grid(out, images, columns, rows)
    count = len(result.images)
    log(f"Wrote {count} image{'s' if count != 1 else ''} and {result.grid}")
    return result


ADAPTER_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


TagKey = tuple[str, Strengths]  # a tag's adapter NAME and the strengths baked into it (te= / unet= / lbw=)


@dataclass
class TaggedPrompts:
    """The prompts' `<lora:NAME:...>` tags, as the webuis read them: each prompt without its tags (what is encoded),
    the strength each tagged adapter is drawn at in it, and the adapter files the names were found as under
    `--lora-dir` (a file whose name without its extension is NAME, in a folder or a subfolder). A tag with one
    strength is drawn at it; one with separate text-encoder and U-Net strengths has them baked in and is drawn at 1;
    each `lbw=` of a NAME is a copy of that adapter with its blocks weighted."""

    encoded: list[str]  # each prompt without its tags
    strengths: list[dict[TagKey, float]]  # per prompt: (NAME, strengths) -> the strength it is drawn at
    files: dict[str, Path]  # NAME -> its file
    names: dict[TagKey, str] = field(default_factory=dict)  # -> the loaded adapter's name, once loaded

    @classmethod
    def read(cls, prompts: list[str], lora_dirs: tuple[str, ...]) -> TaggedPrompts:
        encoded, strengths = [], []
        for prompt in prompts:
            try:
                text, tags = lora_tags(prompt)
            except ValueError as err:
                raise LorakitError(f"a prompt: {err}") from None
            named: dict[TagKey, float] = {}
            for tag in tags:
                if any(name == tag.name for name, _ in named):
                    raise LorakitError(f"a prompt names the adapter {tag.name!r} twice ({tag.written}); give it once")
                if tag.te == tag.unet:
                    named[(tag.name, Strengths(blocks=tag.blocks, start=tag.start, stop=tag.stop))] = tag.te
                else:
                    named[(tag.name, Strengths(tag.te, tag.unet, tag.blocks, tag.start, tag.stop))] = 1.0
            encoded.append(text)
            strengths.append(named)
        wanted = sorted({name for named in strengths for name, _ in named})
        if wanted and not lora_dirs:
            tag = next(t.written for p in prompts for t in lora_tags(p)[1])
            raise LorakitError(
                f"a prompt holds the webui tag {tag}; give the folder of its file with --lora-dir DIR (the webuis' "
                "models/Lora), or load it with --lora FILE:SCALE"
            )
        return cls(encoded, strengths, _find_tagged(wanted, lora_dirs) if wanted else {})

    def load(self, allow_pickle: bool, presets: dict[str, str] | None = None) -> list[LoadedAdapter]:
        """The tagged adapters, read, at scale 1 (each row sets its tags' strengths): one per NAME and strengths."""
        keys = sorted({key for named in self.strengths for key in named}, key=lambda k: (k[0], repr(k[1])))
        loras = [(str(self.files[name]), 1.0) for name, _ in keys]
        loaded, _ = resolve_adapters(loras, allow_pickle, tuple(s for _, s in keys), presets)
        adapters = [replace(adapter, name=f"tag_{adapter.name}") for adapter in loaded]
        self.names = {key: adapter.name for key, adapter in zip(keys, adapters, strict=True)}
        return adapters

    def groups(self, prompt_of_row: list[int]) -> _RowGroups:
        """The rows (each drawing the prompt `prompt_of_row[row]`) grouped by the adapter strengths they ask for."""
        per_row = [
            {adapter: self.strengths[prompt].get(key, 0.0) for key, adapter in self.names.items()}
            for prompt in prompt_of_row
        ]
        grouped: dict[tuple, list[int]] = {}
        for row, strengths in enumerate(per_row):
            grouped.setdefault(tuple(sorted(strengths.items())), []).append(row)
        return _RowGroups([(dict(key), rows) for key, rows in grouped.items()], per_row)


@dataclass
class _RowGroups:
    groups: list[tuple[dict[str, float], list[int]]]  # (adapter name -> strength, the rows drawn with them)
    per_row: list[dict[str, float]]

    def __iter__(self):
        return iter(self.groups)

    def strength(self, row: int, adapter: LoadedAdapter) -> float:
        return self.per_row[row].get(adapter.name, 0.0)


def _find_tagged(names: list[str], lora_dirs: tuple[str, ...]) -> dict[str, Path]:
    """Each tag's NAME as the one adapter file named so under the `--lora-dir` folders."""
    found: dict[str, list[Path]] = {}
    for folder in lora_dirs:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise LorakitError(f"--lora-dir {folder}: not a folder")
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in ADAPTER_SUFFIXES and path.is_file():
                found.setdefault(path.name[: -len(path.suffix)], []).append(path)
    where = ", ".join(lora_dirs)
    files = {}
    for name in names:
        paths = found.get(name, [])
        if not paths:
            close = difflib.get_close_matches(name, list(found), n=3)
            hint = f"close names: {', '.join(close)}" if close else f"it holds {len(found)} adapter files"
            raise LorakitError(f"<lora:{name}>: no {name}.safetensors under --lora-dir {where}; {hint}")
        if len(paths) > 1:
            raise LorakitError(
                f"<lora:{name}>: {len(paths)} files are named so under --lora-dir {where} "
                f"({', '.join(map(str, paths))}); keep one, or load it with --lora FILE:SCALE"
            )
        files[name] = paths[0]
    return files


@dataclass(frozen=True)
class Column:
    """One column of a comparison grid: its label, the suffix of its files, and the adapters' strengths in it (a
    multiplier on every adapter's scale, and a factor per adapter name)."""

    label: str
    suffix: str
    multiplier: float
    factors: dict[str, float] = field(default_factory=dict)
    embedding: Path | None = None  # a save's [embedding] file, put in place of the run's word for this column


COMPARISONS = ("compare_scales", "compare_saves", "compare_lbw")  # the options that each set the grid's columns


def _block_columns(
    adapters: list[LoadedAdapter], specs: tuple[str, ...], presets: dict[str, str] | None
) -> tuple[list[LoadedAdapter], list[Column]]:
    """`--compare-lbw`: the one --lora adapter once per block vector (its te= / unet= kept), and a column drawing
    each alone. Each vector is checked against the adapter's architecture here, before the base is loaded."""
    if len(adapters) != 1:
        raise LorakitError(
            f"--compare-lbw: weights the blocks of one --lora adapter (got {len(adapters)}); give one, and put others "
            "in the prompts as <lora:NAME:W> tags"
        )
    (adapter,) = adapters
    variants = []
    for index, spec in enumerate(specs):
        strengths = replace(adapter.strengths, blocks=spec)
        weighted_state(adapter.state, strengths, str(adapter.path), adapter.family, presets=presets)
        variants.append(replace(adapter, name=f"{adapter.name}_lbw{index}", strengths=strengths))
    columns = [
        Column(
            f"lbw={spec}" if "," not in spec else f"lbw vector {index + 1}",
            f"-lbw{index + 1}",
            1.0,
            {v.name: float(v is variant) for v in variants},
        )
        for index, (spec, variant) in enumerate(zip(specs, variants, strict=True))
    ]
    return variants, columns


@dataclass(frozen=True)
class Save:
    """One of the saves of a run folder that `--compare-saves` draws: its label ("step 500", "epoch 4 (step 20)",
    "final (step 1500)"), its adapter (None for a run that trains an embedding alone) and its [embedding] file
    (None for a run without one)."""

    label: str
    adapter: LoadedAdapter | None
    embedding: Path | None
    steps: int


_SAVE_SUFFIX = r"-(step\d{8}|\d{6})"  # what an intermediate save adds to the run's (or the token's) name


def _saves(loras: list[tuple[str, float]], adapters: list[LoadedAdapter], allow_pickle: bool) -> list[Save]:
    """`--compare-saves`: each save of the run folder among `loras` (an adapter, its embedding, or both), oldest first
    and the final one last."""
    folders = [index for index, (text, _) in enumerate(loras) if Path(text).expanduser().is_dir()]
    if len(folders) != 1:
        raise LorakitError(
            f"--compare-saves: needs one run folder as --lora (got {len(folders)}), e.g. --lora output/character"
        )
    folder, scale = Path(loras[folders[0]][0]).expanduser(), loras[folders[0]][1]
    recipe = load_recipe(RunPaths(folder, "").recipe)
    paths = RunPaths(folder, recipe.output.name)
    token = recipe.embedding.token if recipe.embedding else None
    if recipe.embedding is not None and recipe.embedding.only:  # textual inversion: the embedding files are the saves
        pattern = re.compile(re.escape(token) + _SAVE_SUFFIX + r"\.safetensors")
        files = sorted(p for p in (folder / EMBEDDINGS_FOLDER).glob("*.safetensors") if pattern.fullmatch(p.name))
        saves = [_save(path.stem[len(token) :], _embedding_steps(path), None, path) for path in files]
        saves.append(_final(None, paths.embedding(token)))
    else:
        files = paths.intermediate_adapters()
        loaded, _ = resolve_adapters([(str(f), scale) for f in files], allow_pickle)
        saves = []
        for index, adapter in enumerate(loaded):
            suffix = adapter.path.name.split(".")[0][len(paths.name) :]
            embedding = paths.embedding(token, suffix) if token else None
            renamed = replace(adapter, name=f"save{index}_{adapter.name}", strengths=adapters[folders[0]].strengths)
            saves.append(_save(suffix, adapter.steps, renamed, embedding))
        saves.append(_final(adapters[folders[0]], paths.embedding(token) if token else None))
    if len(saves) < 2:
        raise LorakitError(
            f"--compare-saves: {folder} holds nothing saved before the end (saves come with each checkpoint: "
            "train.save_every_steps or train.save_every_epochs, and output.intermediate_adapters = true)"
        )
    return sorted(saves[:-1], key=lambda save: save.steps) + saves[-1:]


def _save(suffix: str, steps: int, adapter: LoadedAdapter | None, embedding: Path | None) -> Save:
    """An intermediate save, labelled by the epoch or step its name gives and the steps its metadata records (0: it
    records none)."""
    name = suffix.lstrip("-")
    step = steps or (int(name[4:]) if name.startswith("step") else 0)
    label = f"step {step}" if name.startswith("step") else f"epoch {int(name)}" + (f" (step {step})" if step else "")
    return Save(label, adapter, embedding, step)


def _final(adapter: LoadedAdapter | None, embedding: Path | None) -> Save:
    steps = adapter.steps if adapter is not None else _embedding_steps(embedding)
    return Save(f"final (step {steps})" if steps else "final", adapter, embedding, 0)


def _embedding_steps(path: Path) -> int:
    """The optimizer steps an embedding file records (`lorakit_steps`), 0 when it records none."""
    steps = read_embedding(path).metadata.get("lorakit_steps", "")
    return int(steps) if steps.isdigit() else 0


def _triggered(prompt: str, plain: str, trigger: str) -> tuple[str, str]:
    """A prompt with the run's trigger word put in front where it lacks it: (what is encoded, from `plain`, the prompt
    without its tags; what the PNG and the grid say, from `prompt` as written)."""
    encoded = with_trigger(plain, trigger)
    if prompt == plain:
        return encoded, encoded
    return encoded, prompt.strip() if encoded == plain.strip() else f"{trigger}, {prompt.strip()}"


def _open_init(path: str, settings: RenderSettings) -> Any:

    open_heif_with(path)
    try:
        with Image.open(Path(path).expanduser()) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise LorakitError(f"--init {path}: file not found") from None
    except (OSError, UnidentifiedImageError) as err:
        raise LorakitError(f"--init {path}: not a readable image ({err})") from None
    return image.resize((settings.width, settings.height), Image.Resampling.LANCZOS)


def _render_rows(pipe, rows, settings: RenderSettings, options: GenerateOptions, init_image, advance) -> list[Any]:

    prompts, seeds = [p for p, _ in rows], [s for _, s in rows]
    if init_image is not None:
        images = img2img(pipe, [init_image] * len(rows), prompts, seeds, settings, options.strength, advance)
    else:
        images = render(pipe, prompts, seeds, settings, advance)
    if options.upscale > 1:
        width = round(settings.width * options.upscale / 8) * 8
        height = round(settings.height * options.upscale / 8) * 8
        enlarged = [image.resize((width, height), Image.Resampling.LANCZOS) for image in images]
        images = img2img(
            pipe,
            enlarged,
            prompts,
            seeds,
            replace(settings, width=width, height=height),
            options.hires_strength,
            advance,
        )
    return images


def _parameters(
    prompt, seed, size, settings: RenderSettings, options: GenerateOptions, adapters, column, tagged=()
) -> str:
    """The webuis' parameters text: the prompt as written (its tags at the strengths drawn), a tag for each --lora
    adapter drawn, and the hashes of every adapter drawn."""
    drawn = [(a, a.scale * column.multiplier * column.factors.get(a.name, 1.0)) for a in adapters]
    drawn = [(a, scale) for a, scale in drawn if a.name not in column.factors or scale]  # a save's column: its own
    lora_tags = "".join(" " + a.strengths.tag(a.path.name.split(".")[0], scale) for a, scale in drawn)
    hashed = drawn + [(a, scale) for a, scale in tagged if scale]
    extra: dict[str, Any] = {}
    if hashed:
        extra["Lora hashes"] = '"' + ", ".join(f"{a.path.name.split('.')[0]}: {a.short_hash}" for a, _ in hashed) + '"'
    if options.init:
        extra["Denoising strength"] = options.strength
    if options.upscale > 1:
        extra.update({"Hires upscale": options.upscale, "Hires strength": options.hires_strength})
    if settings.guidance_rescale:
        extra["CFG rescale"] = settings.guidance_rescale
    if settings.clip_skip > 1:
        extra["Clip skip"] = settings.clip_skip
    return a1111_parameters(
        scale_lora_tags(prompt, column.multiplier) + lora_tags,
        negative_prompt=settings.negative_prompt,
        steps=settings.steps,
        sampler=SAMPLER_LABELS[settings.sampler],
        guidance=settings.guidance,
        seed=seed,
        width=size[0],
        height=size[1],
        extra=extra,
    )


def _write_grid(out: Path, images: list, columns: list[Column], rows) -> Path:

    if columns[0].label:  # a comparison: a row per prompt and seed, a labelled column per scale or save
        ordered = [
            image
            for row in rows
            for index in range(len(columns))
            for c, p, sd, image in images
            if (p, sd) == row and c == index
        ]
        column_labels = [column.label for column in columns]
        row_labels = [f"{p} (seed {s})" for p, s in rows]
        grid = make_grid(ordered, len(columns), column_labels=column_labels, row_labels=row_labels)
    else:
        column_labels, row_labels = [], []
        grid = make_grid([image for *_, image in images], min(len(images), 4))
    path = out / "grid.png"
    labels = json.dumps({"columns": column_labels, "rows": row_labels})
    save_png(grid, path, f"lorakit grid of {len(images)} images", {"lorakit_grid": labels})
    return path
