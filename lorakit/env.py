"""`lorakit env`: the facts a bug report needs — versions, devices, what works here, and what to fix."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__
from .devices import cpu_has_native_bf16, cuda_facts, eight_bit_optimizer_works
from .stack import OPTIONAL, optional_versions, problems, versions


def collect() -> dict:
    """Everything `lorakit env` reports, as plain data (the `--json` output)."""

    cuda = cuda_facts()
    device = "cuda" if cuda else "cpu"
    works, detail = eight_bit_optimizer_works(device)
    mps = getattr(torch.backends, "mps", None)
    return {
        "lorakit": __version__,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": versions(),
        "optional": optional_versions(),
        "torch": {
            "cuda_build": torch.version.cuda,
            "cuda_available": bool(cuda),
            "devices": cuda,
            "mps_available": bool(mps and mps.is_available()),
            "cpu_bf16_native": cpu_has_native_bf16(),
            "threads": torch.get_num_threads(),
        },
        "bitsandbytes_8bit": {"device": device, "works": works, "detail": detail},
        "problems": [
            {"severity": p.severity, "packages": list(p.packages), "message": p.message, "fix": p.fix}
            for p in problems()
        ],
    }


def _row(label: str, value: str) -> str:
    return f"{label:<16}{value}"


def format_report(facts: dict) -> str:
    """The human-readable report: one fact per line, problems last with their fixes."""
    lines = [
        _row("lorakit", facts["lorakit"]),
        _row("python", f"{facts['python']} ({facts['executable']})"),
        _row("platform", facts["platform"]),
    ]
    lines += [_row(name, version or "not installed") for name, version in facts["packages"].items()]
    for name, version in facts["optional"].items():  # what each gives, and how to get it when missing
        had = (
            f"{version}, for {OPTIONAL[name]}"
            if version
            else f"not installed: pip install {name} for {OPTIONAL[name]}"
        )
        lines.append(_row(name, had))
    torch_facts = facts["torch"]
    lines.append(_row("cuda build", torch_facts["cuda_build"] or "none (CPU build of torch)"))
    for gpu in torch_facts["devices"]:
        lines.append(
            _row(
                f"cuda:{gpu['index']}",
                f"{gpu['name']}, {gpu['memory_gib']} GiB, compute {gpu['compute_capability']}, "
                f"bf16 {'yes' if gpu['bf16'] else 'no'}",
            )
        )
    if not torch_facts["devices"]:
        lines.append(_row("cuda", "not available: training runs on the CPU (slow; fine for the toy world)"))
    lines.append(_row("mps", "available" if torch_facts["mps_available"] else "not available"))
    bf16 = "native" if torch_facts["cpu_bf16_native"] else "emulated (slow)"
    lines.append(_row("cpu bf16", f"{bf16}, {torch_facts['threads']} threads"))
    eight_bit = facts["bitsandbytes_8bit"]
    lines.append(_row("8-bit adamw", f"{'yes' if eight_bit['works'] else 'no'}: {eight_bit['detail']}"))
    if not facts["problems"]:
        lines.append(_row("problems", "none known"))
    for problem in facts["problems"]:
        lines.append(_row(problem["severity"], problem["message"]))
        lines.append(_row("  fix", problem["fix"]))
    return "\n".join(lines)
