"""Merging: adapters into a base model, adapters into one adapter (exact or SVD), and resizing an adapter.

All maths in float32. A LoRA module's update is delta W = up @ down * (alpha / rank); for convolutions
the product is taken on the flattened factors and reshaped to the weight's shape. A LoKr/LoHa module's update
is its `delta()`; it reaches another LoRA only through an SVD of the summed update.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import (
    LoraModule,
    best_factors,
    is_dora,
    kept_rank,
    lora_from_factors,
    lycoris_kind,
    scaled_factors,
)
from .bake import Weighted, adapter_parts, merge_into_models
from .block_weight import Strengths, block_values, read_presets, weighted_state
from .errors import AdapterError, OutputError
from .files import atomic_write, check_output, file_sha256
from .formats.files import write_adapter
from .formats.metadata import BASE_MODEL_VERSION
from .formats.read import read_adapter_file, stored_dtype
from .formats.single_file import to_single_file
from .lycoris import KIND_NAMES, LycorisModule
from .models import base_dtype, load_pipeline
from .render import pipeline_models
from .timestep_rank import schedule_from_metadata

if TYPE_CHECKING:
    from .adapters import LoraState


def refuse_dora(state: LoraState, source: str, action: str) -> None:
    """DoRA's per-row magnitudes are not low-rank updates: they cannot be concatenated, truncated or resized."""
    if is_dora(state):
        raise AdapterError(
            f"{source}: a DoRA adapter cannot be {action} (its magnitudes are not a low-rank update); "
            "merge it into a base model with --base instead"
        )


def _pointwise_as_linear(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1x1 convolution's update is a Linear one (LyCORIS files may store either for the same module)."""
    return shape[:2] if shape[2:] == (1, 1) else shape


def _common_shape(parts: list[tuple[Any, float]]) -> tuple[int, ...]:
    """The weight shape of a module several adapters change: the most specific one given (a 1x1 conv's, over the
    Linear-shaped update of a LoKr file that stores it flat)."""
    return max((p.shape for p, _ in parts), key=len)


def _check_compatible(key: tuple[str, str], parts: list[tuple[LoraModule, float]]) -> None:
    shapes = {_pointwise_as_linear(p.shape) for p, _ in parts}
    if len(shapes) > 1:
        raise AdapterError(
            f"{key[0]} module {key[1]}: the adapters disagree on its shape ({sorted(shapes)}); "
            "they are for different architectures"
        )


def concat_adapters(adapters: list[Weighted]) -> LoraState:
    """One adapter whose effect is exactly the sum of the scaled inputs' effects: ranks concatenated."""

    merged: LoraState = {}
    for key, parts in adapter_parts(adapters).items():
        _check_compatible(key, parts)
        factors = [scaled_factors(lora, scale) for lora, scale in parts]
        up = torch.cat([u for u, _ in factors], dim=1)
        down = torch.cat([d for _, d in factors], dim=0)
        merged.setdefault(key[0], {})[key[1]] = lora_from_factors(up, down, _common_shape(parts))
    return merged


def _truncate(
    up: torch.Tensor, down: torch.Tensor, rank: int, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best factors of up @ down at rank `rank` (or the rank `kept_rank` picks for `energy`), by a QR of the thin
    factors and then a small SVD, and all singular values."""

    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    keep = kept_rank(s, rank, energy)
    root = s[:keep].sqrt()
    new_up = (q_up @ u[:, :keep]) * root
    new_down = root[:, None] * (vh[:keep] @ q_down.T)
    return new_up.float(), new_down.float(), s


def svd_adapters(
    adapters: list[Weighted], rank: int, energy: float | None = None
) -> tuple[LoraState, dict[str, float], float]:
    """The sum of the scaled inputs at rank `rank` per module (with `energy`: the fewest ranks up to `rank` that keep
    that share of each module's energy); relative Frobenius error per module and overall."""
    merged: LoraState = {}
    errors: dict[str, float] = {}
    dropped = total = 0.0
    for key, parts in adapter_parts(adapters).items():
        _check_compatible(key, parts)
        if any(isinstance(m, LycorisModule) for m, _ in parts):
            up, down, s = _truncate_dense(parts, rank, energy)
        else:
            up, down, s = _truncate(*_concat_factors(parts), rank, energy)
        lost, whole = float((s[up.shape[1] :] ** 2).sum()), float((s**2).sum())
        errors[f"{key[0]}.{key[1]}"] = (lost / whole) ** 0.5 if whole else 0.0
        dropped, total = dropped + lost, total + whole
        merged.setdefault(key[0], {})[key[1]] = lora_from_factors(up, down, _common_shape(parts))
    return merged, errors, (dropped / total) ** 0.5 if total else 0.0


def _truncate_dense(
    parts: list[tuple[Any, float]], rank: int, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of the summed update when a LoKr/LoHa module is among the parts (its update has
    no thin factors): the SVD of the whole [out, in * kh * kw] matrix."""
    shape = _common_shape(parts)
    total = torch.zeros(shape[0], math.prod(shape[1:]), dtype=torch.float64)
    for module, scale in parts:
        if isinstance(module, LycorisModule):
            total += module.delta(scale).reshape(shape[0], -1).double()
        else:
            up, down = scaled_factors(module, scale)
            total += (up @ down).double()
    up, down, s = best_factors(total, rank, energy)
    return up.float(), down.float(), s


def _concat_factors(parts: list[tuple[LoraModule, float]]) -> tuple[torch.Tensor, torch.Tensor]:

    factors = [scaled_factors(lora, scale) for lora, scale in parts]
    return torch.cat([u for u, _ in factors], dim=1), torch.cat([d for _, d in factors], dim=0)


def resize_adapter(
    state: LoraState, rank: int, energy: float | None = None
) -> tuple[LoraState, dict[str, float], float]:
    """`state` at rank `rank` by SVD (with `energy`: per module the fewest ranks up to `rank` that keep that share of
    its energy); retained energy (share of squared singular values) per module and overall."""
    merged, errors, overall = svd_adapters([Weighted(state, 1.0, "input")], rank, energy)
    return merged, {k: 1 - e**2 for k, e in errors.items()}, 1 - overall**2


# ---------------------------------------------------------------------------------------------------------------
# The `merge` and `resize` commands: reading inputs, refusing unsafe outputs, recording what went in.

MERGE_RECORD_KEY = "lorakit_merge_inputs"


def _base_fingerprint(base: str) -> str:
    """Identity of a base model: its files' names, sizes and modification times (local), or the hub id."""

    path = Path(base).expanduser()
    if not path.exists():
        return base
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    entries = [
        (str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files
    ]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _read_record(out: Path) -> dict | None:

    try:
        if out.is_dir():
            return json.loads((out / "lorakit_merge.json").read_text(encoding="utf-8"))
        with safe_open(str(out), "pt") as f:
            return json.loads((f.metadata() or {})[MERGE_RECORD_KEY])
    except (OSError, ValueError, KeyError):
        return None


def up_to_date(out: Path, record: dict, inputs: list[Path], overwrite: bool) -> bool:
    """True when `out` already holds this very merge; raises OutputError when it holds something else."""

    if not out.exists():
        check_output(out, inputs, overwrite)
        return False
    check_output(out, inputs, overwrite=True)
    if _read_record(out) == record:
        return True
    if not overwrite:
        raise OutputError(
            f"--out {out}: already exists and was not merged from these inputs; pass --overwrite to "
            "replace it, or choose a new name"
        )
    return False


@dataclass
class MergeResult:
    out: Path
    up_to_date: bool
    relative_error: float | None = None
    modules: int = 0


def merge(
    loras: list[tuple[str, float]],
    out: str | Path,
    *,
    base: str | None = None,
    config: str | None = None,
    fmt: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    save_dtype: str | None = None,
    strengths: tuple[Strengths, ...] = (),
    lbw_presets: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    log=print,
) -> MergeResult:
    """`lorakit merge`: adapters into a base model (diffusers folder or single file), or into one adapter (with
    `rank`, by SVD; with `energy` too, each module at the fewest ranks up to `rank` keeping that share of its energy).
    `save_dtype` defaults to float16 for an adapter and to the precision the base stores its weights in for a base.
    `strengths` (by position) bake each adapter's te= / unet= / lbw= into it first; one adapter alone with strengths
    and no `rank` is written as that adapter with them baked in (LoKr/LoHa stay LoKr/LoHa).
    """

    out = Path(out).expanduser()
    files = [read_adapter_file(path, allow_pickle=allow_pickle) for path, _ in loras]
    families = {a.family for a in files} - {"unknown"}
    if len(families) > 1:
        raise AdapterError(f"the adapters are for different architectures ({', '.join(sorted(families))})")
    for adapter in files:
        if schedule_from_metadata(adapter.metadata, str(adapter.path)) is not None:
            log(
                f"{adapter.path.name}: trained with T-LoRA's timestep schedule; merged at full rank, which is how "
                "other loaders draw it (`lorakit generate` on the file itself follows the schedule)"
            )
    fmt = fmt or (("single-file" if out.suffix == ".safetensors" else "diffusers") if base else "kohya")
    save_dtype = save_dtype or (None if base else "float16")  # None: as the base stores its weights
    strengths = tuple(strengths) + (Strengths(),) * (len(files) - len(strengths))
    for adapter, drawn_with in zip(files, strengths, strict=True):
        if drawn_with.stepped:
            raise AdapterError(
                f"{adapter.path}: start= / stop= apply while drawing (lorakit generate, the webuis); a merged file "
                "has no steps, so drop them"
            )
    presets = read_presets(lbw_presets) if lbw_presets else None
    states = [
        weighted_state(a.state, drawn_with, str(a.path), a.family, presets=presets)
        for a, drawn_with in zip(files, strengths, strict=True)
    ]
    record = {
        "loras": [
            {"file": a.path.name, "sha256": file_sha256(a.path), "scale": s}
            # absent when plain: earlier records still match
            | (
                {}
                if w.plain
                else {"te": w.te, "unet": w.unet, "lbw": w.blocks and block_values(w.blocks, a.family, presets)}
            )
            for a, (_, s), w in zip(files, loras, strengths, strict=True)
        ],
        "base": _base_fingerprint(base) if base else None,
        "rank": rank,
        **({"energy": energy} if energy is not None else {}),  # absent otherwise: earlier records still match
        "format": fmt,
        "dtype": save_dtype,
    }
    inputs = [a.path for a in files] + ([Path(base)] if base else [])
    if up_to_date(out, record, inputs, overwrite):
        log(f"up to date: {out} (same inputs, scales and settings)")
        return MergeResult(out, True)
    weighted = [Weighted(state, s, str(a.path)) for a, state, (_, s) in zip(files, states, loras, strict=True)]
    if base:
        return _merge_into_base(weighted, out, base, config, fmt, save_dtype, record, log)
    family = families.pop() if families else "sd1"
    baked = files[0].metadata if len(files) == 1 and rank is None and not strengths[0].plain else None
    return _merge_adapters(weighted, out, fmt, (rank, energy), save_dtype, record, family, log, baked)


def _merge_adapters(
    weighted: list[Weighted],
    out: Path,
    fmt: str,
    ranks: tuple[int | None, float | None],
    save_dtype: str,
    record: dict,
    family: str,
    log,
    baked: dict[str, str] | None = None,
) -> MergeResult:
    """Adapters into one adapter file; `baked` (the one adapter's metadata) writes that adapter alone with its
    strengths baked in instead."""
    rank, energy = ranks

    if fmt not in ("kohya", "diffusers"):
        raise AdapterError(f"--format {fmt}: merging adapters into one writes 'kohya' or 'diffusers'")
    if baked is not None:
        return _write_baked(weighted[0], out, fmt, save_dtype, record, family, baked, log)
    for adapter in weighted:
        refuse_dora(adapter.state, adapter.name, "merged with other adapters")
        kind = lycoris_kind(adapter.state)
        if kind is not None and rank is None:
            raise AdapterError(
                f"{adapter.name}: a {KIND_NAMES[kind]} adapter merges with others only into a plain LoRA, by SVD of "
                "the summed update; pass --rank N (its error is reported), or merge into a base with --base"
            )
    error = None
    if rank is None:
        state = concat_adapters(weighted)
        log(f"Exact merge: ranks concatenated to {max(m.rank for c in state.values() for m in c.values())}")
    else:
        state, errors, error = svd_adapters(weighted, rank, energy)
        worst = max(errors.items(), key=lambda kv: kv[1])
        ranks_made = [m.rank for c in state.values() for m in c.values()]
        to = f"rank {rank}" if energy is None else f"ranks {min(ranks_made)} to {max(ranks_made)} ({energy:.2%} kept)"
        log(f"SVD merge to {to}: relative error {error:.4%} overall, worst {worst[1]:.4%} ({worst[0]})")
    modules = sum(len(m) for m in state.values())
    top_rank = max(m.rank for c in state.values() for m in c.values())
    dim = "Dynamic" if energy is not None else str(top_rank)  # kohya's mark for a rank per module
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "ss_base_model_version": BASE_MODEL_VERSION.get(family, "sd_v1"),
        "modelspec.merged_from": ", ".join(Path(w.name).name for w in weighted),
        MERGE_RECORD_KEY: json.dumps(record),
    }
    write_adapter(state, out, fmt, save_dtype, metadata, family)
    log(f"Wrote {out} ({modules} modules, {fmt} layout)")
    return MergeResult(out, False, error, modules)


def _write_baked(
    adapter: Weighted, out: Path, fmt: str, save_dtype: str, record: dict, family: str, metadata: dict, log
) -> MergeResult:
    """One adapter with its strengths (already in its factors) and scale baked in, as the same kind of adapter with its
    own ranks, alphas and training metadata, so that it draws at strength 1 what the weighted original drew."""
    whole = Strengths(adapter.scale, adapter.scale)
    state = weighted_state(adapter.state, whole, adapter.name, family)
    metadata = {**metadata, "modelspec.merged_from": Path(adapter.name).name, MERGE_RECORD_KEY: json.dumps(record)}
    write_adapter(state, out, fmt, save_dtype, metadata, family)
    modules = sum(len(m) for m in state.values())
    log(f"Wrote {out} ({modules} modules, {fmt} layout): {Path(adapter.name).name} with its strengths baked in")
    return MergeResult(out, False, None, modules)


def _merge_into_base(
    weighted: list[Weighted],
    out: Path,
    base: str,
    config: str | None,
    fmt: str,
    save_dtype: str | None,
    record: dict,
    log,
) -> MergeResult:
    """The base with the adapters baked in, written in `save_dtype` (None: as the base stores its weights). Each
    merged weight is W + update in float32, rounded once to the saved dtype. A base stored in that dtype is read in
    it (SDXL in float16 holds 7 GB, not 14); any other is read in float32 and cast as it is written."""

    if fmt not in ("diffusers", "single-file"):
        raise AdapterError(f"--format {fmt}: merging into a base writes 'diffusers' (a folder) or 'single-file'")
    stored = base_dtype(base)
    wanted = save_dtype or stored
    pipe = load_pipeline(
        base, config=config, dtype=wanted if wanted == stored else "float32", log=log, as_options=True
    )
    stored = stored or base_dtype(base)  # a hub base's files are in the cache once it is read
    save = save_dtype or stored or "float32"
    models = pipeline_models(pipe)
    changed = merge_into_models(models, weighted)
    pipe.to(dtype=getattr(torch, save))
    why = "as the base stores its weights" if stored else "the base's stored precision is unknown"
    log(
        f"Merged {len(weighted)} adapter(s) into {changed} modules of {base}; writing {save}"
        + ("" if save_dtype else f" ({why}; --save-dtype to change)")
    )
    if fmt == "single-file":
        schedule = pipe.scheduler.config
        tensors = to_single_file(
            {**models, "vae": pipe.vae},
            v_prediction=schedule.prediction_type == "v_prediction",
            zero_terminal_snr=bool(schedule.get("rescale_betas_zero_snr")),
        )
        metadata = {MERGE_RECORD_KEY: json.dumps(record), "modelspec.merged_from": base}
        atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            pipe.save_pretrained(staging)
            (staging / "lorakit_merge.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"Wrote {out} ({fmt})")
    return MergeResult(out, False, None, changed)


def resize(
    path: str | Path,
    rank: int,
    out: str | Path | None = None,
    *,
    energy: float | None = None,
    save_dtype: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    log=print,
) -> tuple[Path, float]:
    """`lorakit resize`: the adapter at `rank` by SVD, or with `energy` at the fewest ranks up to `rank` that keep
    that share of each module's energy; logs retained energy per module and overall. A LoKr/LoHa adapter becomes a
    plain LoRA (its relative error logged too)."""

    adapter = read_adapter_file(path, allow_pickle=allow_pickle)
    refuse_dora(adapter.state, str(adapter.path), "resized")
    stem = (
        adapter.path.name[: -len(".safetensors")] if adapter.path.name.endswith(".safetensors") else adapter.path.stem
    )
    out = Path(out) if out else adapter.path.with_name(f"{stem}.rank{rank}.safetensors")
    check_output(out, [adapter.path], overwrite)
    state, retained, overall = resize_adapter(adapter.state, rank, energy)
    for module, kept in sorted(retained.items(), key=lambda kv: kv[1])[:5]:
        log(f"  {kept:.4%} retained  {module}")
    ranks = [m.rank for modules in state.values() for m in modules.values()]
    if energy is None:
        log(f"Resized to rank {rank}: {overall:.4%} of the update's energy retained overall ({len(ranks)} modules)")
    else:
        log(
            f"Resized keeping {energy:.2%} of each module's energy (rank at most {rank}): ranks {min(ranks)} to "
            f"{max(ranks)}, mean {sum(ranks) / len(ranks):.1f}; {overall:.4%} retained overall ({len(ranks)} modules)"
        )
    metadata = {k: v for k, v in adapter.metadata.items() if k != "lora_adapter_metadata"}
    dim = str(rank) if energy is None else "Dynamic"  # kohya's resize marks a per-module rank so
    metadata.update(ss_network_dim=dim, ss_network_alpha=dim)
    kind = lycoris_kind(adapter.state)
    if kind is not None:
        error = max(0.0, 1 - overall) ** 0.5
        bound = f"at most {rank}" if energy else str(rank)
        log(f"{KIND_NAMES[kind]} -> LoRA rank {bound}: relative error {error:.4%} of the update (Frobenius)")
        metadata.update(ss_network_module="networks.lora", ss_network_args="{}")
    write_adapter(state, out, adapter.layout, save_dtype or stored_dtype(adapter), metadata, adapter.family)
    log(f"Wrote {out}")
    return out, overall
