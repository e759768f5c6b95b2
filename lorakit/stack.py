"""The third-party stack lorakit runs on: installed versions, known-bad combinations, and their noise.

Every check here reads package metadata (`importlib.metadata`) or a constant the library itself declares,
so it costs no model and no download. `problems()` is what `lorakit env` prints and what every heavy
command checks first: a combination that would fail mid-run is refused up front in one line that names
both packages and the pip command that fixes it.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from importlib import metadata

# The packages a bug report needs, in the order `lorakit env` prints them.
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "safetensors",
    "datasets",
    "huggingface_hub",
    "tokenizers",
    "typer",
    "pillow",
)
# Packages lorakit uses only when asked for, with what they give (each is one of pyproject's extras).
OPTIONAL = {
    "prodigyopt": 'train.optimizer = "prodigy"',
    "schedulefree": 'train.optimizer = "adamw_schedulefree"',
    "pillow-heif": "HEIC/HEIF photos in `lorakit prepare`",
    "tensorboard": "the run folder's tensorboard/ logs",
    "wandb": 'output.log_with = ["wandb"] (Weights & Biases)',
}
# The tested set: the repository's constraints file, made by `.ci/lock`.
FIX_ALL = "pip install -c constraints.txt -e .   (from a lorakit checkout; installs the tested versions)"


@dataclass(frozen=True)
class Problem:
    """A combination of installed packages that breaks (error) or limits (note) what lorakit can do."""

    packages: tuple[str, ...]
    message: str
    fix: str
    severity: str = "error"  # "error": a lorakit command would fail; "note": lorakit is unaffected

    def line(self) -> str:
        return f"{self.message}; fix: {self.fix}"


def installed(package: str) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a bug report needs (None where missing)."""
    return {name: installed(name) for name in PACKAGES}


def optional_versions() -> dict[str, str | None]:
    """Installed versions of the optional packages (None where missing)."""
    return {name: installed(name) for name in OPTIONAL}


def _lorakit_requirements() -> list:
    from packaging.requirements import Requirement

    try:
        declared = metadata.requires("lorakit") or []
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return []
    return [r for r in map(Requirement, declared) if r.marker is None]


def _outside_declared_ranges() -> list[Problem]:
    """Installed dependencies outside the ranges lorakit declares (what pip would not have chosen)."""
    found = []
    for requirement in _lorakit_requirements():
        version = installed(requirement.name)
        if version is None:
            why = f"{requirement.name} is not installed (lorakit needs {requirement})"
        elif requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            why = f"{requirement.name} {version} is outside lorakit's tested range {requirement.specifier}"
        else:
            continue
        found.append(Problem((requirement.name,), why, f'pip install "{requirement}"'))
    return found


def _declared_minimum(module: str, constant: str) -> str | None:
    """A minimum version a library declares as a module constant, or None where it declares none."""
    from importlib import import_module

    try:
        value = getattr(import_module(module), constant, None)
    except ImportError:
        return None
    return value if isinstance(value, str) else None


def _peft_gates() -> list[Problem]:
    """peft releases that diffusers or transformers refuse in their own adapter code."""
    from packaging.version import Version

    peft = installed("peft")
    if peft is None:
        return []
    found = []
    diffusers_min = _declared_minimum("diffusers.utils.constants", "MIN_PEFT_VERSION")
    if diffusers_min and Version(peft) < Version(diffusers_min):
        found.append(
            Problem(
                ("diffusers", "peft"),
                f"diffusers {installed('diffusers')} refuses peft {peft} (it needs >= {diffusers_min}); "
                "generate and in-training samples cannot load adapters",
                f'pip install "peft>={diffusers_min}"',
            )
        )
    transformers_min = _declared_minimum("transformers.integrations.peft", "MIN_PEFT_VERSION")
    if transformers_min and Version(peft) < Version(transformers_min):
        found.append(
            Problem(
                ("transformers", "peft"),
                f"transformers {installed('transformers')} refuses peft {peft} in its own adapter API "
                f"(model.add_adapter needs peft >= {transformers_min}); lorakit injects through peft directly "
                "and is unaffected, other scripts in this environment are not",
                f'pip install "transformers<{installed("transformers")}" for those scripts, or a peft >= '
                f"{transformers_min} once one is released",
                severity="note",
            )
        )
    return found


def problems() -> list[Problem]:
    """Every known-bad combination in this environment: errors first, combinations of packages before ranges."""
    found = _peft_gates() + _outside_declared_ranges()
    return sorted(found, key=lambda p: p.severity != "error")


def version_mismatch_message(err: Exception) -> str | None:
    """One line for a library's own version refusal that escaped the up-front check, else None."""
    text = str(err)
    if "version" not in text.lower() or "peft" not in text.lower():
        return None
    have = ", ".join(f"{name} {installed(name)}" for name in ("peft", "transformers", "diffusers"))
    return f"{text.strip().splitlines()[0]} (installed: {have}); fix: {FIX_ALL}"


# Third-party notices that tell a lorakit user nothing they can act on. LORAKIT_DEBUG=1 keeps them all.
_NOISY_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",  # "Failed to load CPU gemm_4bit_forward from kernels-community" (4-bit only)
    "bitsandbytes.cextension",
)
_NOISY_WARNINGS = (r".*torchvision.*",)  # diffusers' and transformers' notices that torchvision is absent


def quiet_third_party() -> None:
    """Silence the ML libraries' progress bars and notices that say nothing actionable."""
    if os.environ.get("LORAKIT_DEBUG") == "1":
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
