"""System memory while a base model loads for float16 training or a float16 render, and while a LoRA is merged into
it: the process's anonymous memory (what it owns) and its resident file pages (weights mapped from the file, which
the kernel can drop and re-read), at their peak.

A full-size base with random weights (the real architecture, float16) is written as a diffusers folder and as a
float16 and a float32 single file. Each case loads it in a fresh process while a thread samples /proc/self/status
every 2 ms: for training with `load_base(..., weight_dtype="float16")`, for a render (`lorakit generate` on CUDA)
with `load_pipeline(..., dtype="float16")`, for a merge with `merge` (a random rank-8 LoRA on every attention
projection, written as a single file; its "U-Net, VAE" column is the dtype written). "float32 first" is the path
lorakit took before: every component read in float32, then cast (a merge: read, merged and written in float32).
Linux only. Run by hand (SD 1.5: about 8 minutes and 15 GB of disk; SDXL: about 25 minutes, 50 GB):

    OMP_NUM_THREADS=1 python benchmarks/load_memory.py [--arch sd15|sdxl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEASURE = """
import json, sys, threading, time
import torch
from lorakit.models import load_base, load_pipeline

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024

base, config, task, case, adapter = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4], sys.argv[5]
start_anon, start_file = status()
peak = {"anon": 0, "file": 0}
done = False

def sample():
    while not done:
        anon, file = status()
        peak["anon"] = max(peak["anon"], anon - start_anon)
        peak["file"] = max(peak["file"], file - start_file)
        time.sleep(0.002)

watcher = threading.Thread(target=sample)
watcher.start()
if task == "merge":  # `merge --base` into a single file; float32 first: read, merged and written in float32
    from lorakit.formats.read import tensors_dtypes
    from lorakit.merge import merge

    out = adapter + ".merged.safetensors"
    save_dtype = "float32" if case == "float32 first" else None
    merge([(adapter, 1.0)], out, base=base, config=config, save_dtype=save_dtype, overwrite=True, log=lambda _: None)
    written = tensors_dtypes(out, "model.diffusion_model.", "first_stage_model.")
elif task == "render":  # what `generate` holds: the whole pipeline in float16
    loaded = load_pipeline(base, config=config, dtype="float32" if case == "float32 first" else "float16")
    loaded.to("cpu", torch.float16)
elif case == "float32 first":
    loaded = load_base(base, config=config, weight_dtype="float32")
    for module in (loaded.unet, *loaded.text_encoders):
        module.to(torch.float16)
else:
    loaded = load_base(base, config=config, weight_dtype="float16")
time.sleep(0.05)
done = True
watcher.join()
if task != "merge":
    written = str(loaded.unet.dtype), str(loaded.vae.dtype)
print(json.dumps({**peak, "unet": written[0], "vae": written[1]}))
"""


def write_files(arch: str, folder: Path) -> dict[str, Path]:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from gpu_speed import write_base
    from safetensors.torch import save_file

    from lorakit.formats.files import write_adapter
    from lorakit.formats.single_file import to_single_file

    base = write_base(arch, folder / "base", "cpu")
    pipeline = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = pipeline.from_pretrained(str(base), dtype=torch.float16)
    names = ("unet", "vae", "text_encoder", "text_encoder_2") if arch == "sdxl" else ("unet", "vae", "text_encoder")
    tensors = to_single_file({name: getattr(pipe, name) for name in names})
    save_file(tensors, str(folder / "half.safetensors"))
    save_file({k: v.float() for k, v in tensors.items()}, str(folder / "full.safetensors"))
    family = "sdxl" if arch == "sdxl" else "sd1"
    write_adapter(_random_lora(pipe.unet), folder / "lora.safetensors", "kohya", "float16", {}, family)
    return {
        "folder": base,
        "half": folder / "half.safetensors",
        "full": folder / "full.safetensors",
        "lora": folder / "lora.safetensors",
    }


def _random_lora(unet) -> dict:
    """A rank-8 LoRA on every attention projection of `unet`, random weights (what is merged does not matter)."""
    import torch

    from lorakit.adapters import LoraModule

    generator = torch.Generator().manual_seed(0)
    modules = {}
    for path, module in unet.named_modules():
        if path.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or path.endswith("to_out.0"):
            down = torch.randn(8, module.in_features, generator=generator) * 0.01
            modules[path] = LoraModule(down, torch.randn(module.out_features, 8, generator=generator) * 0.01, 8.0)
    return {"unet": modules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorakit-load-") as tmp:
        files = write_files(args.arch, Path(tmp))
        config = str(files["folder"])
        bases = [
            ("diffusers folder (float16 files)", files["folder"], ""),
            ("single file, float16", files["half"], config),
            ("single file, float32", files["full"], config),
        ]
        print(f"| {args.arch} base, in float16 | for | path | anonymous GB | file pages GB | U-Net, VAE |")
        print("|---|---|---|---|---|---|")
        for task in ("train", "render", "merge"):
            for name, path, config_arg in bases:
                for case in ("float32 first", "as lorakit loads"):
                    if task in ("train", "merge") and path == files["full"] and case == "float32 first":
                        continue  # a float32 file is read in float32 either way: the same path
                    _measure(task, name, path, config_arg, case, files["lora"])


def _measure(task: str, name: str, path: Path, config_arg: str, case: str, adapter: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), config_arg, task, case, str(adapter)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"| {name} | {task} | {case} | {row['anon'] / 1e9:.2f} | {row['file'] / 1e9:.2f} | "
        f"{row['unet'].removeprefix('torch.')}, {row['vae'].removeprefix('torch.')} |"
    )


if __name__ == "__main__":
    main()
