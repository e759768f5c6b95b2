"""`output.log_with`: the curves of metrics.jsonl and the sample grids in TensorBoard and Weights & Biases (offline,
so no account and no network), and a tracker that cannot start named before anything is loaded."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict, write_recipe
from .invoke import fails, pixels


@pytest.fixture(scope="module")
def tracked_run(tiny_base, tiny_dataset, tmp_path_factory):
    """Three steps logged to TensorBoard and to wandb in offline mode, with samples at steps 2 and 3."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path_factory.mktemp("tracked"),
        train={"max_steps": 3, "save_every_steps": 2},
        sample={"prompts": ["ohwx toy"], "steps": 2},
    )
    recipe["output"] |= {"log_with": ["tensorboard", "wandb"], "wandb_project": "toys"}
    try:
        result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    finally:
        import wandb

        wandb.teardown()  # wandb keeps its settings (offline mode) for the process until then
        monkeypatch.undo()
    return result


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_wandb_gets_every_logged_value_the_recipe_and_the_sample_grids(tracked_run):
    (folder,) = (tracked_run.run_dir / "wandb").glob("offline-run-*")
    (record,) = folder.glob("run-*.wandb")
    data = record.read_bytes()  # its history items keep each value as JSON text
    rows = _rows(tracked_run.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert json.dumps(row["loss"]).encode() in data and json.dumps(row["lr_unet"]).encode() in data
    assert b"toys" in data and b"train.max_steps" in data and b"output.wandb_project" in data
    images = sorted((folder / "files" / "media" / "images").glob("samples_*.png"))
    assert [int(p.name.split("_")[1]) for p in images] == [2, 3]
    for step, image in zip((2, 3), images, strict=True):
        assert np.array_equal(pixels(image), pixels(tracked_run.run_dir / "samples" / f"step-{step:06d}.png"))


def test_tensorboard_gets_the_same_curves_and_the_sample_grids(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run.run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in _rows(tracked_run.run_dir)]
    assert [s for s, _ in losses] == [s for s, _ in expected]
    assert np.allclose([v for _, v in losses], [v for _, v in expected], rtol=1e-6)
    grids = events.Images("samples")
    assert [g.step for g in grids] == [2, 3]
    (width, height) = Image.open(tracked_run.run_dir / "samples" / "step-000003.png").size
    assert (grids[-1].width, grids[-1].height) == (width, height)


def _recipe_file(tiny_base, tiny_dataset, tmp_path, **output):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 1})
    recipe["output"] |= output
    return write_recipe(tmp_path / "recipe.toml", recipe)


def test_wandb_without_its_package_or_an_account_is_named_before_loading(
    tiny_base, tiny_dataset, tmp_path, monkeypatch
):
    path = _recipe_file(tiny_base, tiny_dataset, tmp_path, log_with=["wandb"])
    for name in ("WANDB_API_KEY", "WANDB_MODE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    loads = []
    monkeypatch.setattr("lorakit.train.setup._load_base", lambda *a, **k: loads.append(a))
    fails(["train", str(path)], "output.log_with: wandb has no account to log to")
    fails(["train", str(path)], "run `wandb login` or set WANDB_API_KEY, or set WANDB_MODE=offline")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    fails(["train", str(path)], "output.log_with: 'wandb' needs the wandb package; run `pip install wandb`")
    assert not loads


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ({"log_with": ["mlflow"]}, "output.log_with: ['mlflow'] is not a list of 'tensorboard', 'wandb'"),
        ({"log_with": ["wandb", "wandb"]}, "output.log_with: 'wandb' is listed twice; give it once"),
        ({"log_with": ["wandb"], "wandb_project": "me/toys"}, "output.wandb_project: 'me/toys' holds /"),
        ({"log_with": ["wandb"], "wandb_project": ""}, "output.wandb_project: '' is empty"),
    ],
)
def test_tracker_settings_that_cannot_work_are_refused_in_one_line(
    tiny_base, tiny_dataset, tmp_path, output, fragment
):
    fails(["train", str(_recipe_file(tiny_base, tiny_dataset, tmp_path, **output))], fragment)


def test_an_empty_log_with_logs_to_metrics_jsonl_alone(tiny_base, tiny_dataset, tmp_path):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 1})
    recipe["output"] |= {"log_with": []}
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    assert len(_rows(result.run_dir)) == 1
    assert not (result.run_dir / "tensorboard").exists() and not (result.run_dir / "wandb").exists()


def test_a_resumed_run_continues_the_same_wandb_run(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 2})
    recipe["output"] |= {"log_with": ["wandb"]}
    wandb.teardown()  # settings an earlier test left in this process (wandb keeps them until then)
    try:
        first = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
        recipe["train"]["max_steps"] = 4
        train(recipe_from_dict(recipe), resume="latest", quiet=True, log=lambda _: None)
        again = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "other", train={"max_steps": 1})
        again["output"] |= {"log_with": ["wandb"]}
        other = train(recipe_from_dict(again), quiet=True, log=lambda _: None)
    finally:
        wandb.teardown()
    run_id = (first.run_dir / "wandb" / "lorakit-run-id").read_text().strip()
    runs = sorted((first.run_dir / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with -1 added when both started within one second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-[\d_]+-{run_id}(-\d+)?", r.name) for r in runs)
    (resumed,) = runs[1].glob("run-*.wandb")
    rows = _rows(first.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(json.dumps(r["loss"]).encode() in resumed.read_bytes() for r in rows[2:])
    assert (other.run_dir / "wandb" / "lorakit-run-id").read_text().strip() != run_id  # another run, another id
