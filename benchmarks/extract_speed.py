"""How long `lorakit extract` takes on the real SD 1.5 / SDXL architectures: the per-module work it does.

Loading the two models is a read from disk like any other; what extraction adds is, per targeted module, the
difference of the two weights at the comparison precision and its SVD. This benchmark builds each architecture on
the meta device (no weights), takes the shapes of every module the `transformer` preset targets (the U-Net and the
text encoder(s)), and runs exactly that work (`extract._change` and `extract._factor`) on random float16 weights
whose difference is a rank-64 change plus small full-rank noise, like a fine-tune's. Run by hand, one thread:

    OMP_NUM_THREADS=1 python benchmarks/extract_speed.py [--arch sd15 sdxl] [--rank 32] [--device cpu|cuda]

It prints the modules, the seconds their SVDs take (each distinct weight shape is timed once and counted as
often as it occurs), and the share of the change a rank-`--rank` LoRA keeps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shapes(architecture: str) -> list[tuple[str, tuple[int, ...]]]:
    """(component.path, weight shape) of every module `lorakit extract --targets transformer` factors."""
    from lorakit.adapters import matching_modules, resolve_targets
    from lorakit.architectures import build_on_meta

    components = ["unet", "text_encoder"] + (["text_encoder_2"] if architecture == "sdxl" else [])
    found = []
    for component in components:
        model = build_on_meta(architecture, component)
        for path in matching_modules(model, resolve_targets("transformer", component)):
            found.append((f"{component}.{path}", tuple(model.get_submodule(path).weight.shape)))
    return found


def run(architecture: str, rank: int, device: str) -> tuple[int, int, float, float]:
    """(modules, distinct shapes, seconds, share of the change's energy kept) for one architecture. Modules of one
    shape cost the same, so each distinct shape is timed once and counted as often as it occurs."""
    from collections import Counter

    import torch

    from lorakit.extract import _change, _factor

    generator = torch.Generator().manual_seed(0)
    where = torch.device(device)
    seconds = kept = total = 0.0
    modules = Counter(shape for _, shape in shapes(architecture))
    for shape, count in modules.items():
        flat = (shape[0], int(torch.tensor(shape[1:]).prod()))
        base = torch.randn(flat, generator=generator) * 0.02
        wanted = min(64, *flat)
        low_rank = torch.randn(flat[0], wanted, generator=generator) @ torch.randn(
            wanted, flat[1], generator=generator
        )
        tuned = base + 1e-4 * low_rank + 1e-5 * torch.randn(flat, generator=generator)
        base, tuned = base.half(), tuned.half()
        if where.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        change = _change(tuned, base, torch.float16, where)
        _, _, module_kept, module_total = _factor(change, rank)
        if where.type == "cuda":
            torch.cuda.synchronize()
        seconds += count * (time.perf_counter() - start)
        kept, total = kept + count * module_kept, total + count * module_total
    return sum(modules.values()), len(modules), seconds, kept / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sd21", "sdxl"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.device}, rank {args.rank}")
    print("| architecture | modules (distinct shapes) | SVD seconds | change kept |")
    print("|---|---|---|---|")
    for architecture in args.arch:
        modules, distinct, seconds, share = run(architecture, args.rank, args.device)
        print(f"| {architecture} | {modules} ({distinct}) | {seconds:.0f} | {share:.2%} |")


if __name__ == "__main__":
    main()
