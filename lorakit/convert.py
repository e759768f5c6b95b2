"""`convert` and `inspect`: adapter files between layouts, and what is inside one."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from .adapters import lycoris_kind, scaled_factors
from .block_weight import LAYOUTS, block_of, layers_per_block
from .embedding import looks_like_embedding, read_embedding
from .errors import AdapterError
from .files import check_output
from .formats.files import write_adapter
from .formats.read import FAMILY_NAMES, read_adapter_file, stored_dtype
from .lycoris import KIND_NAMES, LycorisModule


def default_convert_path(path: Path, to: str) -> Path:
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem
    if stem.endswith(".diffusers"):
        stem = stem[: -len(".diffusers")]
    return path.with_name(f"{stem}.diffusers.safetensors" if to == "diffusers" else f"{stem}.kohya.safetensors")


def convert_adapter(
    path: str | Path, to: str, out: str | Path | None = None, *, overwrite: bool = False, allow_pickle: bool = False
) -> Path:
    """Write the adapter at `path` in the `to` layout (kohya or diffusers); returns the new file. LoKr/LoHa files have
    the kohya (LyCORIS) layout only: converting one rewrites it there (e.g. a pickle to .safetensors)."""
    adapter = read_adapter_file(path, allow_pickle=allow_pickle)
    kind = lycoris_kind(adapter.state)
    if kind is not None and to != "kohya":
        raise AdapterError(
            f"{adapter.path}: a {KIND_NAMES[kind]} adapter has no diffusers layout (diffusers cannot load LoKr/LoHa); "
            "use --to kohya, or `lorakit resize --rank N` to turn it into a LoRA first"
        )
    out = Path(out) if out else default_convert_path(adapter.path, to)
    check_output(out, [adapter.path], overwrite)
    return write_adapter(adapter.state, out, to, stored_dtype(adapter), adapter.metadata, adapter.family)


def inspect_adapter(path: str | Path, *, allow_pickle: bool = False) -> dict:
    """Layout, architecture, ranks, alphas, module counts, metadata and update norms of an adapter file; for a
    textual-inversion embedding, its word, vectors and their norms."""

    if Path(path).suffix.lower() == ".safetensors" and looks_like_embedding(Path(path)):
        return _inspect_embedding(read_embedding(Path(path)))
    adapter = read_adapter_file(path, allow_pickle=allow_pickle)
    components, by_block = {}, {}
    layers = layers_per_block(adapter.state)
    for component, modules in sorted(adapter.state.items()):
        norms = {}
        for module_path, lora in modules.items():
            if isinstance(lora, LycorisModule):
                norms[module_path] = float(lora.delta().norm())
            else:
                up, down = scaled_factors(lora)
                norms[module_path] = float(torch.linalg.matrix_norm(up @ down))
        for module_path, norm in norms.items():
            block = block_of(component, module_path, layers) or "other"
            by_block[block] = by_block.get(block, 0.0) + norm * norm
        largest = sorted(norms.items(), key=lambda kv: -kv[1])[:5]
        kinds = Counter(m.kind if isinstance(m, LycorisModule) else "lora" for m in modules.values())
        components[component] = {
            "type": "+".join(sorted(kinds)),
            "modules": len(modules),
            "parameters": sum(m.numel for m in modules.values()),
            "ranks": sorted({lora.rank for lora in modules.values()}),
            "alphas": sorted({lora.alpha for lora in modules.values() if lora.alpha is not None}),
            "conv_modules": sum(len(m.shape) == 4 and m.shape[2:] != (1, 1) for m in modules.values()),
            "dora_modules": sum(getattr(lora, "magnitude", None) is not None for lora in modules.values()),
            "update_norm_total": sum(v * v for v in norms.values()) ** 0.5,
            "update_norm_largest": [{"module": k, "norm": v} for k, v in largest],
        }
    return {
        "file": str(adapter.path),
        "layout": adapter.layout,
        "architecture": adapter.family,
        "components": components,
        # LoRA Block Weight's blocks (what lbw= weights), in its order; "other": U-Net modules outside the blocks
        "update_norm_by_block": {b: by_block[b] ** 0.5 for b in [*LAYOUTS[26], "other"] if b in by_block},
        "finite": True,
        "metadata": adapter.metadata,
        "warnings": _loader_warnings(adapter),
    }


_ATTENTION_PROJECTIONS = re.compile(r"\.(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj)$")


def _loader_warnings(adapter) -> list[str]:
    """What a loader would do differently from the file's own numbers."""
    if adapter.layout != "kohya":
        return []
    alphas = Counter(
        lora.alpha
        for modules in adapter.state.values()
        for path, lora in modules.items()
        if _ATTENTION_PROJECTIONS.search(path) and not isinstance(lora, LycorisModule)
    )
    if len(alphas) < 2:
        return []
    common = alphas.most_common(1)[0][0]
    return [
        f"attention projections carry {len(alphas)} different alphas ({', '.join(f'{a:g}' for a in sorted(alphas))}); "
        f"diffusers' kohya loader applies the most common one ({common:g}) to all of them, so diffusers draws "
        "something else than A1111/ComfyUI; `lorakit convert --to diffusers` keeps every alpha exactly"
    ]


def _inspect_embedding(embedding) -> dict:
    encoders = {"emb_params": "text encoder", "clip_l": "CLIP-L", "clip_g": "OpenCLIP bigG"}
    return {
        "file": str(embedding.path),
        "layout": "textual inversion",
        "architecture": embedding.family,
        "word": embedding.word,
        "vectors": {
            encoders[key]: {
                "count": v.shape[0],
                "width": v.shape[1],
                "norms": [round(float(n), 4) for n in v.float().norm(dim=1)],
            }
            for key, v in embedding.vectors.items()
        },
        "finite": all(bool(torch.isfinite(v).all()) for v in embedding.vectors.values()),
        "metadata": embedding.metadata,
        "warnings": [],
    }


def inspection_lines(info: dict) -> list[str]:
    if info["layout"] == "textual inversion":
        lines = [
            f"{info['file']}",
            "  layout: textual-inversion embedding (loads in A1111/Forge, ComfyUI, diffusers and lorakit generate "
            "--embedding)",
            f"  architecture: {FAMILY_NAMES[info['architecture']]}",
            f"  word: {info['word']!r} (write it in a prompt to call the embedding)",
            "  weights: "
            + ("all finite (no NaN or inf)" if info["finite"] else "NOT FINITE: NaN or inf in the vectors"),
        ]
        for encoder, entry in info["vectors"].items():
            norms = ", ".join(f"{n:.3g}" for n in entry["norms"])
            lines.append(f"  {encoder}: {entry['count']} vectors of width {entry['width']} (norms {norms})")
        return lines
    lycoris = any(entry["type"] in KIND_NAMES and entry["type"] != "lora" for entry in info["components"].values())
    if lycoris:
        where = "(LyCORIS: loads in A1111/Forge, ComfyUI and lorakit; not in diffusers)"
    elif info["layout"] == "kohya":
        where = "(loads in A1111/Forge, ComfyUI and diffusers)"
    else:
        where = "(loads in diffusers)"
    lines = [
        f"{info['file']}",
        f"  layout: {info['layout']} {where}",
        f"  architecture: {FAMILY_NAMES[info['architecture']]}",
        "  weights: all finite (no NaN or inf)",
    ]
    for component, entry in info["components"].items():
        lines.append(
            f"  {component}: {entry['modules']} {'/'.join(KIND_NAMES[t] for t in entry['type'].split('+'))} modules "
            f"({entry['conv_modules']} 3x3 conv"
            + (f", {entry['dora_modules']} DoRA" if entry["dora_modules"] else "")
            + f"), {entry['parameters']:,} parameters, rank "
            f"{'/'.join(map(str, entry['ranks']))}, alpha {'/'.join(f'{a:g}' for a in entry['alphas']) or '-'}, "
            f"update norm {entry['update_norm_total']:.4g}"
        )
        for largest in entry["update_norm_largest"][:3]:
            lines.append(f"      {largest['norm']:.4g}  {largest['module']}")
    blocks = ", ".join(f"{block} {norm:.3g}" for block, norm in info["update_norm_by_block"].items())
    lines.append(f"  update norm by block (lbw= names): {blocks}")
    metadata = info["metadata"] or {}
    if "lorakit_slider_note" in metadata:  # whoever got the file learns which way each sign moves
        lines.append(f"  slider: {metadata['lorakit_slider_note']}")
    if "lorakit_adapter_strengths" in metadata:
        lines.append(f"  image slider: trained at these strengths by folder: {metadata['lorakit_adapter_strengths']}")
    lines += [f"  warning: {warning}" for warning in info.get("warnings", [])]
    if info["metadata"]:
        lines.append("  metadata:")
        for key, value in sorted(info["metadata"].items()):
            shown = value if len(value) <= 80 else value[:77] + "..."
            lines.append(f"    {key}: {shown}")
    else:
        lines.append("  metadata: none")
    return lines
