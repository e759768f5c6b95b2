"""`lorakit extract`: a LoRA from the difference between a fine-tuned model and the base it was tuned from.

Every targeted Linear / Conv2d weight's change, delta W = W_tuned - W_base, is factored by SVD and kept at the
given rank: the best approximation of that rank in the Frobenius norm (Eckart-Young), stored with alpha = rank so
that it applies at strength 1. Before subtracting, both weights are rounded to the coarser of the two models' stored
precisions: a base kept in float32 and a fine-tune saved in float16 would otherwise differ everywhere by rounding
alone. A module whose change is then zero (at most `min_diff`) gets no adapter, and is counted.

A LoRA only holds changes of the weights it targets; what else the fine-tune changed (biases, norms, embeddings,
weights outside the targets, the VAE) is counted and reported, never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import PRESETS, LoraState, best_factors, lora_from_factors, matching_modules, resolve_targets
from .errors import AdapterError, ModelError
from .files import check_output
from .formats.files import write_adapter
from .formats.metadata import AdapterInfo, kohya_metadata
from .formats.read import FAMILY_NAMES
from .models import base_dtype, detect_family, is_local, load_pipeline
from .progress import progress_bar
from .render import pipeline_models

EXTRACT_RECORD_KEY = "lorakit_extracted_from"
_HALF = ("float16", "bfloat16")


@dataclass
class ExtractResult:
    out: Path
    modules: int  # modules that got an adapter
    energy: float  # share of the targeted change's squared Frobenius norm the adapter keeps (1.0: all of it)
    unchanged: dict[str, int] = field(default_factory=dict)  # component -> targeted modules that did not change
    # component -> changed tensors left out: (weights a wider --targets would extract, tensors no LoRA holds)
    left_out: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class _Model:
    models: dict[str, Any]  # the components an adapter can change, by the names adapter files use
    vae: Any
    family: str
    stored: str | None  # the precision its files store the weights in; None when unknown
    prediction_type: str

    def every_component(self) -> dict[str, Any]:
        """The adapter-bearing components and the VAE: everything a fine-tune may have changed."""
        return {**self.models, "vae": self.vae}


def _load(source: str, option: str, config: str | None, log) -> _Model:
    """A base or a fine-tune, read in its stored precision when that is a half one (an SDXL pair in float16 holds
    10 GB, not 20)."""
    stored = base_dtype(source)
    pipe = load_pipeline(
        source,
        config=config,
        dtype=stored if stored in _HALF else "float32",
        log=log,
        as_options=True,
        base_option=option,
    )
    models = pipeline_models(pipe)
    family = "sdxl" if "text_encoder_2" in models else detect_family({}, dict(pipe.unet.config))
    stored = stored or base_dtype(source)  # a hub model's files are in the cache once it is read
    return _Model(models, pipe.vae, family, stored, pipe.scheduler.config.prediction_type)


def comparison_dtype(first: str | None, second: str | None) -> torch.dtype:
    """The precision both weights are rounded to before subtracting: the coarser of the two stored ones (float32
    when they are two different half precisions, or unknown)."""
    halves = {d for d in (first, second) if d in _HALF}
    return getattr(torch, halves.pop()) if len(halves) == 1 else torch.float32


def _change(tuned: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return tuned.detach().to(device, dtype).float() - base.detach().to(device, dtype).float()


def _factor(
    change: torch.Tensor, rank: int, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(up [out, k], down [k, in], kept, total): the best rank-k factors of a flat change (k = `rank`, or the rank
    `kept_rank` picks for `energy`) and its squared Frobenius norm, kept and in all."""
    up, down, s = best_factors(change, rank, energy)
    squares = s.double() ** 2
    return up.cpu(), down.cpu(), float(squares[: up.shape[1]].sum()), float(squares.sum())


def _check_same_architecture(tuned: _Model, base: _Model, source: str) -> None:
    if tuned.family != base.family:
        raise ModelError(
            f"TUNED: {source} is an {FAMILY_NAMES[tuned.family]} model and --base an {FAMILY_NAMES[base.family]} one; "
            "give the base the model was fine-tuned from"
        )
    for component, model in base.every_component().items():
        theirs = tuned.every_component()[component].state_dict()
        for name, tensor in model.state_dict().items():
            if name not in theirs or theirs[name].shape != tensor.shape:
                found = "has no such tensor" if name not in theirs else f"has shape {tuple(theirs[name].shape)}"
                raise ModelError(
                    f"TUNED: {source}'s {component} {found} where --base has {name} {tuple(tensor.shape)}; "
                    "it is not a fine-tune of this base"
                )


def extract(
    tuned: str,
    base: str,
    out: str | Path,
    *,
    rank: int,
    energy: float | None = None,
    conv_rank: int | None = None,
    targets: str = "transformer",
    config: str | None = None,
    fmt: str = "kohya",
    save_dtype: str = "float16",
    min_diff: float = 0.0,
    device: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    log=print,
) -> ExtractResult:
    """`lorakit extract`: the change from `base` to `tuned` in the modules `targets` names (a preset of
    `adapters.PRESETS`), as a LoRA of `rank` (3x3 convolutions: `conv_rank`, default `rank`) written to `out`.
    Logs the share of the change kept (overall and the five worst modules) and what the adapter cannot carry.

    Raises ModelError when a model cannot be loaded or the two are not the same architecture, AdapterError when
    nothing targeted changed, OutputError for an unsafe `out`.
    """
    if targets not in PRESETS:
        raise AdapterError(f"--targets {targets}: use one of {', '.join(PRESETS)}")
    out = Path(out).expanduser()
    check_output(out, [Path(p).expanduser() for p in (tuned, base) if is_local(p)], overwrite)
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: no CUDA device is visible here; use --device cpu")
    if where.type == "cuda" and (where.index or 0) >= torch.cuda.device_count():
        raise ModelError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    base_model = _load(base, "--base", config, log)
    tuned_model = _load(tuned, "TUNED", config, log)
    _check_same_architecture(tuned_model, base_model, tuned)
    dtype = comparison_dtype(base_model.stored, tuned_model.stored)
    log(
        f"Comparing in {str(dtype).removeprefix('torch.')} (TUNED stores "
        f"{tuned_model.stored or 'an unknown precision'}, --base {base_model.stored or 'an unknown precision'}) "
        f"on {where}"
    )

    jobs = []  # (component, module path, base module, tuned module)
    for component, model in base_model.models.items():
        theirs = dict(tuned_model.models[component].named_modules())
        for path in matching_modules(model, resolve_targets(targets, component)):
            jobs.append((component, path, model.get_submodule(path), theirs[path]))
    ranks = (rank, conv_rank or rank, energy)
    state, retained, unchanged, kept, total = _factor_all(jobs, ranks, min_diff, dtype, where, quiet)
    if not state:
        raise AdapterError(
            f"TUNED {tuned} and --base {base} do not differ in any module --targets {targets} reaches (compared in "
            f"{str(dtype).removeprefix('torch.')}{f', ignoring changes up to {min_diff:g}' if min_diff else ''}); "
            "nothing to extract"
        )

    targeted = {(component, path) for component, path, _, _ in jobs}
    left_out = _changes_left_out(tuned_model, base_model, targeted, dtype, where)
    for component in base_model.models:
        line = f"  {component}: {len(state.get(component, {}))} modules"
        log(line + (f", {unchanged[component]} unchanged (no adapter)" if unchanged.get(component) else ""))
    for component, (wider, other) in left_out.items():
        if wider:
            log(f"  {component}: {_tensors(wider)} left out that --targets transformer+conv extracts")
        if other:
            what = "a LoRA does not change the VAE" if component == "vae" else "biases, norms, embeddings"
            log(f"  {component}: {_tensors(other)} left out that no LoRA holds ({what})")
    for module, share in sorted(retained.items(), key=lambda kv: kv[1])[:5]:
        log(f"  {share:.4%} kept  {module}")
    share = kept / total if total else 1.0
    modules = sum(len(m) for m in state.values())
    if energy is None:
        log(f"Extracted rank {rank}: {share:.4%} of the change's energy kept overall ({modules} modules)")
    else:
        ranks = [m.rank for c in state.values() for m in c.values()]
        log(
            f"Extracted keeping {energy:.2%} of each module's change (rank at most {rank}): ranks {min(ranks)} to "
            f"{max(ranks)}, mean {sum(ranks) / len(ranks):.1f}; {share:.4%} kept overall ({modules} modules)"
        )

    info = AdapterInfo(
        family=base_model.family,
        base_model=base,
        prediction_type=tuned_model.prediction_type,
        rank=rank,
        alpha=float(rank),
        targets=targets,
        output_name=out.name.removesuffix(".safetensors"),
        training={
            "ss_network_args": json.dumps(
                {"conv_dim": str(conv_rank or rank), "conv_alpha": str(conv_rank or rank)}
                if targets == "transformer+conv"
                else {}
            ),
            EXTRACT_RECORD_KEY: json.dumps(
                {
                    "tuned": tuned,
                    "base": base,
                    "rank": rank,
                    "energy": energy,
                    "conv_rank": conv_rank,
                    "targets": targets,
                }
            ),
            # a rank per module: kohya's dynamic resize says so in place of one number
            **({"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"} if energy is not None else {}),
        },
    )
    write_adapter(state, out, fmt, save_dtype, kohya_metadata(info), base_model.family)
    log(f"Wrote {out} ({modules} modules, {fmt} layout)")
    return ExtractResult(out, modules, share, unchanged, left_out)


def _factor_all(
    jobs: list[tuple[str, str, Any, Any]],
    ranks: tuple[int, int, float | None],
    min_diff: float,
    dtype: torch.dtype,
    where: torch.device,
    quiet: bool,
) -> tuple[LoraState, dict[str, float], dict[str, int], float, float]:
    """Factor every (component, path, base module, tuned module) job's change at (rank, 3x3 conv rank, energy):
    the adapters, the share of each module's change kept, the unchanged modules per component, and the squared
    norm of the change kept and in all."""
    rank, conv_rank, energy = ranks
    state: LoraState = {}
    retained: dict[str, float] = {}
    unchanged: dict[str, int] = {}
    kept = total = 0.0
    with torch.no_grad(), progress_bar("Extracting", len(jobs), quiet=quiet) as bar:
        for component, path, mine, theirs in jobs:
            change = _change(theirs.weight, mine.weight, dtype, where)
            bar.advance()
            if not change.numel() or float(change.abs().max()) <= min_diff:
                unchanged[component] = unchanged.get(component, 0) + 1
                continue
            spatial = change.dim() == 4 and change.shape[2:] != (1, 1)
            up, down, module_kept, module_total = _factor(
                change.reshape(change.shape[0], -1), conv_rank if spatial else rank, energy
            )
            state.setdefault(component, {})[path] = lora_from_factors(up, down, tuple(change.shape))
            retained[f"{component}.{path}"] = module_kept / module_total
            kept, total = kept + module_kept, total + module_total
    return state, retained, unchanged, kept, total


def _tensors(count: int) -> str:
    return f"{count} changed tensor{'s' if count != 1 else ''}"


def _changes_left_out(
    tuned: _Model, base: _Model, targeted: set[tuple[str, str]], dtype: torch.dtype, where: torch.device
) -> dict[str, tuple[int, int]]:
    """Per component (the VAE too), the tensors outside the targeted weights that the fine-tune changed: how many
    are weights of modules the widest preset (transformer+conv) adapts, and how many no LoRA holds."""
    counts = {}
    for component, model in base.every_component().items():
        carried = {f"{path}.weight" for c, path in targeted if c == component}
        widest = (
            set()
            if component == "vae"
            else {f"{path}.weight" for path in matching_modules(model, resolve_targets("transformer+conv", component))}
        )
        theirs = tuned.every_component()[component].state_dict()
        changed = [
            name
            for name, tensor in model.state_dict().items()
            if name not in carried
            and tensor.is_floating_point()
            and bool(_change(theirs[name], tensor, dtype, where).abs().max() > 0)
        ]
        wider = sum(name in widest for name in changed)
        if changed:
            counts[component] = (wider, len(changed) - wider)
    return counts
