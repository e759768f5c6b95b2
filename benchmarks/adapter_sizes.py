"""Parameters and file size of each adapter type on the real SD 1.5 and SDXL architectures (meta device).

The U-Net and text encoder(s) are built from lorakit's shipped configs on the meta device (no weights, no
memory), adapters are injected exactly as `lorakit train` injects them (peft, the `transformer` preset, text
encoders included), and the trainable parameters are counted; the file size is that count in float16 (the
recipes' `save_dtype`) plus a few kilobytes of names and metadata. Run by hand:

    python benchmarks/adapter_sizes.py            # prints the README's table
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = [
    ("LoRA rank 16", "lora", {"rank": 16}),
    ("LoRA rank 32", "lora", {"rank": 32}),
    ("LoHa rank 8", "loha", {"rank": 8}),
    ("LoHa rank 16", "loha", {"rank": 16}),
    ("LoKr rank 16, factor -1", "lokr", {"rank": 16}),
    ("LoKr rank 16, factor 8", "lokr", {"rank": 16, "decompose_factor": 8}),
    ("LoKr full (rank 10000), factor 8", "lokr", {"rank": 10000, "decompose_factor": 8}),
    ("LoKr full (rank 10000), factor 16", "lokr", {"rank": 10000, "decompose_factor": 16}),
]


def count(architecture: str, kind: str, options: dict) -> int:
    from lorakit.adapters import inject_lora, lora_parameters
    from lorakit.architectures import build_on_meta

    components = ["unet", "text_encoder"] + (["text_encoder_2"] if architecture == "sdxl" else [])
    total = 0
    for component in components:
        model = build_on_meta(architecture, component)
        lycoris = {k: options[k] for k in ("decompose_factor",) if k in options}
        inject_lora(
            model,
            component,
            rank=options["rank"],
            lora_alpha=options["rank"],
            dropout=0.0,
            target_modules="transformer",
            kind=kind,
            lycoris_options=lycoris if kind == "lokr" else {},
        )
        total += sum(p.numel() for p in lora_parameters(model))
    return total


def main() -> None:
    lines = [
        "| adapter | SD 1.5 parameters | SD 1.5 file (fp16) | SDXL parameters | SDXL file (fp16) |",
        "|---|---|---|---|---|",
    ]
    for label, kind, options in CONFIGS:
        cells = []
        for architecture in ("sd15", "sdxl"):
            params = count(architecture, kind, options)
            cells += [f"{params / 1e6:.2f} M", f"{params * 2 / 2**20:.1f} MiB"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
