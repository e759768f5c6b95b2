"""The house's floors: every import in lorakit (function bodies included) points down, never up or sideways.

    cli -> demo/toy -> commands -> parts -> base

A command may use parts and base, never another command (demo and the toy world drive the commands, so they sit
one floor above them). Parts may use each other and base; base uses only base. docs/ARCHITECTURE.md explains
what lives on each floor.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lorakit"

# Floor of each module or package (longest prefix wins); a lower number is a higher floor.
FLOORS = {
    "lorakit.cli": 0,
    "lorakit.__main__": 0,
    "lorakit.demo": 1,
    "lorakit.toy": 1,
    "lorakit.prepare": 2,
    "lorakit.train": 2,
    "lorakit.merge": 2,
    "lorakit.convert": 2,
    "lorakit.extract": 2,
    "lorakit.kohya_config": 2,
    "lorakit.generate": 2,
    "lorakit.env": 2,
    "lorakit.plan": 2,
    "lorakit.data": 3,
    "lorakit.models": 3,
    "lorakit.base_files": 3,
    "lorakit.adapters": 3,
    "lorakit.lycoris": 3,
    "lorakit.objective": 3,
    "lorakit.render": 3,
    "lorakit.checkpoint": 3,
    "lorakit.formats": 3,
    "lorakit.optim": 3,
    "lorakit.ema": 3,
    "lorakit.devices": 3,
    "lorakit.architectures": 3,
    "lorakit.memory": 3,
    "lorakit.timestep_rank": 3,
    "lorakit.dropout": 3,
    "lorakit.bake": 3,
    "lorakit.block_weight": 3,
    "lorakit.embedding": 3,
    "lorakit.emphasis": 3,
    "lorakit.slider": 3,
    "lorakit.float8": 3,
    "lorakit.recipe": 4,
    "lorakit.errors": 4,
    "lorakit.files": 4,
    "lorakit.progress": 4,
    "lorakit.buckets": 4,
    "lorakit.stack": 4,
    "lorakit.trigger": 4,
    "lorakit.prompt_syntax": 4,
    "lorakit": 4,  # the package itself: __version__
}
NAMES = {0: "cli", 1: "demo/toy", 2: "commands", 3: "parts", 4: "base"}


def _owner(module: str) -> str:
    """The FLOORS key a module belongs to."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in FLOORS:
            return ".".join(parts[:end])
    raise AssertionError(f"{module} has no floor in tests/test_layers.py FLOORS; give it one")


def _module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every lorakit import in the file, wherever it stands."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lorakit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "lorakit":
                target = node.module
            else:
                continue
            # `from . import adapters` names a module, `from .x import y` a module x
            if node.module is None:
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def layer_violations(root: Path = PACKAGE) -> list[str]:
    """Every import that points up a floor, or sideways between two commands."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        source = _owner(_module_name(path, root))
        for line, target in _imports(path, root):
            owner = _owner(target)
            mine, theirs = FLOORS[source], FLOORS[owner]
            upward = theirs < mine
            sideways = mine == theirs == 2 and owner != source
            if upward or sideways:
                where = path.relative_to(root.parent)
                problems.append(f"{where}:{line}: {NAMES[mine]} {source} imports {NAMES[theirs]} {target}")
    return problems


def test_every_import_points_down():
    assert layer_violations() == []


def test_a_planted_upward_import_is_caught(tmp_path):
    planted = tmp_path / "lorakit"
    shutil.copytree(PACKAGE, planted, ignore=shutil.ignore_patterns("__pycache__"))
    data = planted / "data.py"
    data.write_text(data.read_text() + "\n\ndef _helper():\n    from .train import train\n\n    return train\n")
    found = layer_violations(planted)
    assert len(found) == 1 and "lorakit/data.py" in found[0] and "parts lorakit.data imports commands" in found[0]


def test_every_module_has_a_floor():
    for path in PACKAGE.rglob("*.py"):
        _owner(_module_name(path, PACKAGE))
