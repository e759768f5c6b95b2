"""What the machine can do: the training device, its memory, and which half-precision formats run natively."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# CPU feature flags (Linux /proc/cpuinfo) that mean bfloat16 arithmetic in hardware; without them torch
# emulates bf16 on the CPU, several times slower than float32.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86 AVX512-BF16/AMX, Arm BF16)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return platform.system() == "Darwin" and platform.machine() == "arm64"  # Apple M2 and later
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and _BF16_FLAGS & set(value.split()):
            return True
    return False


def cuda_facts() -> list[dict]:
    """Name, memory, compute capability and bf16 support of each visible CUDA device (empty without CUDA)."""

    if not torch.cuda.is_available():
        return []
    facts = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        facts.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
                "bf16": props.major >= 8,  # Ampere and later compute bf16 natively
            }
        )
    return facts


def eight_bit_optimizer_works(device: str) -> tuple[bool, str]:
    """Run one bitsandbytes AdamW8bit step on `device`; (works, what happened) with the state's dtype."""

    try:
        import bitsandbytes as bnb
    except Exception as err:  # noqa: BLE001 - any import failure means the optimizer is unavailable
        return False, f"bitsandbytes does not import: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    try:
        # 4096 elements: bitsandbytes keeps smaller tensors' state in float32 (its min_8bit_size).
        param = torch.nn.Parameter(torch.ones(64, 64, device=device))
        optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.full_like(param, 0.5)
        optimizer.step()
        dtype = optimizer.state[param]["state1"].dtype
    except Exception as err:  # noqa: BLE001 - report whatever the library raised, this is a diagnostic
        return False, f"AdamW8bit step failed on {device}: {str(err).splitlines()[0] if str(err) else err!r}"
    if dtype != torch.uint8:
        return False, f"AdamW8bit on {device} kept its state in {dtype}, not 8-bit"
    return True, f"AdamW8bit runs on {device} (state uint8)"
