"""examples/ runs as written: each walk-through's commands in order, on the toy world, with its own checks.

The scripts keep to a small part of bash (comments, `set`, variable defaults, `mkdir -p` and `lorakit` lines) so
that the suite can run their `lorakit` lines in-process; a line outside that part fails here, not on a user's
machine. The variables each script reads (BASE, DEMO, OUT, STEPS, MORE_STEPS) point at a quickly built toy base
and a few training steps.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.formats.read import read_adapter_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TESTED = {  # every example, each run by the test of its number below
    "01-three-commands.sh",
    "02-resume-and-extend.sh",
    "03-adapter-toolbox.sh",
    "04-will-it-fit.sh",
    "05-lokr.sh",
    "06-load-in-diffusers.py",
    "07-block-weight.sh",
    "08-slider.sh",
    "09-image-slider.sh",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")
runner = CliRunner()


def _expand(text: str, env: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match[1] or match[3]
        if name in env:
            return env[name]
        if match[2] is not None:
            return _expand(match[2], env)
        raise AssertionError(f"${name} is not set")

    return _VARIABLE.sub(value, text)


def script_commands(path: Path, env: dict[str, str]) -> list[list[str]]:
    """The commands of an example script, variables expanded as bash would: ['lorakit', ...] or ['mkdir', ...]."""
    commands = []
    for number, line in enumerate(path.read_text(encoding="utf-8").replace("\\\n", " ").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line == "set -euo pipefail":
            continue
        if assignment := re.fullmatch(r'(\w+)="(.*)"', line):
            env[assignment[1]] = _expand(assignment[2], env)
            continue
        words = shlex.split(_expand(line, env), comments=True)
        if words[0] == "lorakit" or words[:2] == ["mkdir", "-p"]:
            commands.append(words)
            continue
        raise AssertionError(f"{path.name}:{number}: outside the examples' part of bash: {line}")
    return commands


def run_script(name: str, env: dict[str, str]) -> list[str]:
    """Run an example's commands in order, as `bash examples/NAME` does from the repository root; their outputs."""
    outputs = []
    for command in script_commands(EXAMPLES / name, dict(env)):
        if command[0] == "mkdir":
            Path(command[2]).mkdir(parents=True, exist_ok=True)
            continue
        result = runner.invoke(app, command[1:])
        assert result.exit_code == 0, f"{name}: {shlex.join(command)}\n{result.output}"
        outputs.append(result.stdout)
    return outputs


def test_every_example_is_listed_in_the_readme_and_run_here():
    shipped = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".sh", ".py")}
    assert shipped == TESTED
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    assert all(f"({name})" in readme for name in shipped)


def test_the_examples_part_of_bash_is_enforced(tmp_path):
    script = tmp_path / "x.sh"
    script.write_text('OUT="${OUT:-out}"\nlorakit inspect "$OUT/a b.safetensors" --json\nrm -rf "$OUT"\n')
    with pytest.raises(AssertionError, match=r"x.sh:3: outside the examples' part of bash: rm -rf"):
        script_commands(script, {"OUT": "/tmp/o"})
    script.write_text('OUT="${OUT:-$HOME/out}"\nlorakit inspect "$OUT/a b.safetensors"\n')
    assert script_commands(script, {"HOME": "/home/me"}) == [["lorakit", "inspect", "/home/me/out/a b.safetensors"]]


def toy_world(folder: Path, base: Path) -> dict[str, str]:
    """The variables the examples read, for `base` and the photos `lorakit demo` would have left, written into
    `folder`; a few training steps."""
    from lorakit.toy import write_class_photos, write_concept_photos

    write_concept_photos(folder / "demo" / "photos")
    write_class_photos(folder / "demo" / "class_photos")
    env = {"BASE": str(base), "DEMO": str(folder / "demo"), "OUT": str(folder / "out")}
    return {**env, "STEPS": "2", "MORE_STEPS": "4"}


@pytest.fixture(scope="module")
def examples_run(quick_toy_base, tmp_path_factory, monkeypatch_module):
    """Example 01 on the toy world: the others start from it."""
    env = toy_world(tmp_path_factory.mktemp("examples"), quick_toy_base)
    monkeypatch_module.chdir(ROOT)  # the scripts name examples/ and recipes/ from the repository root
    outputs = run_script("01-three-commands.sh", env)
    return env, Path(env["OUT"]), outputs


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _rank(adapter: Path) -> int:
    """The one rank of every LoRA module in a kohya file."""
    (rank,) = {t.shape[0] for k, t in load_file(adapter).items() if k.endswith("lora_down.weight")}
    return rank


def test_01_three_commands_give_a_dataset_an_adapter_and_a_comparison(examples_run):
    _, out, outputs = examples_run
    rows = (out / "dataset" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 12 and all("sks" in json.loads(row)["text"].split(" ") for row in rows)
    adapter = out / "runs" / "first-lora" / "first-lora.safetensors"
    assert outputs[1].strip() == str(adapter) and _rank(adapter) == 8
    assert len(list((out / "compare").glob("*-seed0-x0.png"))) == 2  # two prompts without the adapter
    assert len(list((out / "compare").glob("*-seed0-x1.png"))) == 2  # and with it
    assert (out / "compare" / "grid.png").is_file()


def test_02_a_resumed_run_logs_every_step_once(examples_run):
    env, out, _ = examples_run
    run_script("02-resume-and-extend.sh", env)
    run = out / "runs" / "resumed"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step-000004"
    # what the script's comment promises: the steps an unbroken run of MORE_STEPS takes, bit for bit
    places = [f"model.base={env['BASE']}", f"data.folder={out / 'dataset'}", f"output.folder={out / 'runs'}"]
    places += [f"prior.class_dir={env['DEMO']}/class_photos", "output.name=unbroken", "train.max_steps=4"]
    unbroken = runner.invoke(app, ["train", "examples/first-lora.toml", "-q", *[f"--set={p}" for p in places]])
    assert unbroken.exit_code == 0, unbroken.output
    resumed = load_file(run / "resumed.safetensors")
    whole = load_file(out / "runs" / "unbroken" / "unbroken.safetensors")
    assert resumed.keys() == whole.keys() and all(resumed[k].equal(whole[k]) for k in whole)


def test_03_the_toolbox_writes_what_it_says(examples_run):
    env, out, _ = examples_run
    outputs = run_script("03-adapter-toolbox.sh", env)
    assert "layout: kohya" in outputs[0]
    tools = out / "tools"
    assert _rank(tools / "first-lora-r4.safetensors") == 4
    assert _rank(tools / "combined.safetensors") == 12  # 8 + 4, stacked exactly
    converted = load_file(tools / "first-lora.diffusers.safetensors")
    assert any(k.startswith("unet.") for k in converted) and any(k.startswith("text_encoder.") for k in converted)
    merged = load_file(tools / "merged-model.safetensors")
    assert any(k.startswith("model.diffusion_model.") for k in merged)
    assert (tools / "merged-render" / "grid.png").is_file()
    extracted = read_adapter_file(tools / "extracted.safetensors").state
    trained = read_adapter_file(out / "runs" / "first-lora" / "first-lora.safetensors").state
    assert set(extracted["unet"]) == set(trained["unet"]) and _rank(tools / "extracted.safetensors") == 8


def test_04_plans_and_a_fitted_recipe_that_loads(examples_run):
    from lorakit.recipe import load_recipe

    env, out, _ = examples_run
    outputs = run_script("04-will-it-fit.sh", env)
    assert "Card RTX 3060 12GB: fits" in outputs[0]
    fitted = load_recipe(out / "sdxl-character-8gb.toml")
    shipped = load_recipe(ROOT / "recipes" / "sdxl-character.toml")
    assert (shipped.model.weight_dtype, fitted.model.weight_dtype) == ("float16", "float8")
    assert fitted.lora.rank == shipped.lora.rank  # float8 weights alone make it fit
    assert json.loads(outputs[2])["recipe"] == "recipes/style.toml"


def test_05_a_lokr_adapter_trains_and_renders(examples_run):
    env, out, _ = examples_run
    outputs = run_script("05-lokr.sh", env)
    adapter = out / "runs" / "first-lokr" / "first-lokr.safetensors"
    assert any(".lokr_w" in k for k in load_file(adapter)) and "LoKr modules" in outputs[1]
    assert len(list((out / "lokr-compare").glob("*.png"))) == 3  # scales 0 and 1, and the grid


def test_06_diffusers_draws_what_lorakit_generate_drew(examples_run, monkeypatch, capsys):
    env, out, _ = examples_run
    for name in ("BASE", "OUT"):
        monkeypatch.setenv(name, env[name])
    runpy.run_path(str(EXAMPLES / "06-load-in-diffusers.py"), run_name="__main__")
    assert capsys.readouterr().out.strip().endswith("largest difference from lorakit generate's picture: 0 of 255")
    assert (out / "diffusers.png").is_file()


def test_07_block_vectors_compare_in_one_grid_and_bake_into_a_file(examples_run):
    from PIL import Image

    env, out, _ = examples_run
    outputs = run_script("07-block-weight.sh", env)
    assert "update norm by block (lbw= names): BASE " in outputs[0] and " OUT03 " in outputs[0]
    compare = out / "blocks" / "compare"
    with Image.open(compare / "grid.png") as grid:
        assert json.loads(grid.text["lorakit_grid"])["columns"] == [f"lbw vector {i}" for i in (1, 2, 3)]
    assert len(list(compare.glob("*-lbw*.png"))) == 6  # 2 seeds x 3 vectors
    baked = read_adapter_file(out / "blocks" / "outputs-only.safetensors").state
    assert set(baked) == {"unet"} and {p.split(".")[0] for p in baked["unet"]} == {"mid_block", "up_blocks"}
    assert "BASE" not in outputs[-1].split("update norm by block")[1].splitlines()[0]


def test_08_a_slider_learns_from_prompts_and_draws_at_both_strengths(examples_run):
    env, out, _ = examples_run
    outputs = run_script("08-slider.sh", env)
    assert "activations, batch 4 x2 ([slider]: +1 and -1) at 16x16" in outputs[0]
    assert read_adapter_file(out / "runs" / "background-slider" / "background-slider.safetensors").state.keys() == {
        "unet"
    }
    compare = out / "slider-compare"
    assert len(list(compare.glob("*-x*.png"))) == 10  # 2 prompts x 5 strengths
    assert (compare / "000-seed0-x-2.png").is_file() and (compare / "009-seed0-x2.png").is_file()


def test_09_an_image_slider_trains_from_photo_pairs(examples_run):
    env, out, _ = examples_run
    outputs = run_script("09-image-slider.sh", env)
    assert outputs[0].split() == [str(out / "pairs" / "red"), str(out / "pairs" / "blue")]
    run = out / "runs" / "colour-slider"
    assert json.loads(load_file_metadata(run / "colour-slider.safetensors")["lorakit_adapter_strengths"]) == {
        "red-dataset": 1.0,
        "blue-dataset": -1.0,
    }
    assert len(list((out / "colour-compare").glob("*-x*.png"))) == 6  # 2 prompts x 3 strengths


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return handle.metadata()


@pytest.mark.slow
def test_the_scripts_run_in_bash(quick_toy_base, tmp_path):
    """The scripts themselves, in bash with the installed `lorakit`: what the in-process runs above cannot see
    (quoting, line continuations, the variables' defaults). About 4 minutes: every command imports the ML stack."""
    import os
    import shutil
    import subprocess
    import sys

    bin_dir = str(Path(sys.executable).parent)
    assert shutil.which("lorakit", path=bin_dir), "the lorakit command is not installed beside this python"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **toy_world(tmp_path, quick_toy_base)}
    runs = {}
    for name in sorted(TESTED):
        command = ["bash", str(EXAMPLES / name)] if name.endswith(".sh") else [sys.executable, str(EXAMPLES / name)]
        runs[name] = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert runs[name].returncode == 0, f"{name}:\n{runs[name].stderr[-3000:]}"
    diffusers_run = runs["06-load-in-diffusers.py"].stdout.strip()
    assert diffusers_run.endswith("largest difference from lorakit generate's picture: 0 of 255")
