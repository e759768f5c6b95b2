"""Nothing lost: runs killed at every kind of write site, or at random moments, finish bit-identical to an
uninterrupted run; every crash state a power cut allows during a checkpoint save leaves a verified checkpoint;
two runs cannot share a folder; a resume refuses what it cannot continue; stops, full disks and divergence end
in one line that keeps the last good checkpoint. benchmarks/reliability.py runs the same with the full counts."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat

import pytest
import torch
from safetensors.torch import load_file

import lorakit.train.loop as loop
from lorakit import checkpoint as ckpt
from lorakit.errors import Interrupted, LorakitError, OutputError
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from . import reliability as R
from .conftest import make_recipe_dict

FIGURES = R.FIGURES

SMALL = {"max_steps": 4, "save_every_steps": 2, "keep_checkpoints": 1, "log_every_steps": 1}


@pytest.fixture(scope="module")
def harness(tiny_base, tiny_dataset, tmp_path_factory):
    """A zygote, a private copy of the dataset (its cache is cleared per case) and the uninterrupted reference."""
    root = tmp_path_factory.mktemp("reliability")
    data = root / "dataset"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns(".cache"))
    zygote = R.Zygote()

    def recipe(name: str) -> dict:
        return make_recipe_dict(tiny_base, data, root / name, train=dict(SMALL))

    assert zygote.run(recipe("reference"), overwrite=True) == 0
    yield zygote, recipe, root / "reference" / "run", root
    zygote.close()


def _record(outcome: R.Outcome) -> None:
    FIGURES["SIGKILLs"] += outcome.killed
    FIGURES["corrupt files"] += len(outcome.problems)
    FIGURES["escaped exceptions"] += outcome.escaped
    FIGURES["adapters not bit-identical"] += not outcome.identical
    FIGURES["runs with a step lost or logged twice"] += not outcome.steps_logged_once


def test_killed_at_each_kind_of_write_site_the_run_finishes_identically(harness):
    zygote, recipe, reference, root = harness
    points = R.trace_kill_points(zygote, recipe("trace"), root / "trace.txt")
    sites = sorted({site for site, _ in points})
    assert {"cache", "write", "fsync", "rename", "dir-fsync", "checkpoint-file", "manifest"} <= set(sites)
    assert {"checkpoint-rename", "prune", "metrics-line"} <= set(sites)
    chosen = [(site, 1) for site in sites] + [points[-1]]  # the first arrival at each site, and the very last
    for point in chosen:
        outcome = R.kill_and_finish(zygote, recipe("killed"), reference, point=point)
        _record(outcome)
        FIGURES["kill points"] += 1
        assert outcome.killed, point
        assert outcome.identical and outcome.steps_logged_once and not outcome.problems and not outcome.escaped, (
            point,
            outcome,
        )


def test_an_io_error_at_any_write_of_the_last_save_and_export_gives_one_line_and_loses_nothing(harness):
    zygote, recipe, reference, root = harness
    points = R.trace_kill_points(zygote, recipe("trace-io"), root / "trace-io.txt")
    first_save_done = points.index(("checkpoint-rename", 1))
    tail = [p for p in points[first_save_done + 1 :] if p[0] != "metrics-line"]  # the step-4 save, prune, export
    assert {"checkpoint-file", "manifest", "checkpoint-rename", "write", "fsync", "rename"} <= {s for s, _ in tail}
    for point in tail:
        outcome = R.kill_and_finish(zygote, recipe("faulty"), reference, point=point, fail=True)
        FIGURES["I/O faults injected"] += 1
        FIGURES["corrupt files"] += len(outcome.problems)
        FIGURES["escaped exceptions"] += outcome.escaped
        assert outcome.exit_code == 2, (point, outcome)  # one line from lorakit, not a traceback
        assert outcome.identical and outcome.steps_logged_once and not outcome.problems, (point, outcome)


def test_random_sigkills_change_nothing(harness):
    zygote, recipe, reference, _ = harness
    for delay in R.random_delays(3, longest=2.5, seed=1):
        outcome = R.kill_and_finish(zygote, recipe("random"), reference, delay=delay)
        _record(outcome)
        assert outcome.identical and outcome.steps_logged_once and not outcome.problems and not outcome.escaped


def test_every_power_loss_state_of_a_checkpoint_save_leaves_a_verified_checkpoint(tmp_path, monkeypatch):
    states, operations, resumed = R.replay_power_loss(tmp_path, monkeypatch)
    FIGURES["power-loss states"] += states
    assert states > operations  # every cut point, plus the torn, undone and partly removed variants
    assert resumed == {"step-000002", "step-000004"}  # cuts before the rename keep the old one, after give the new


def test_a_second_run_on_the_same_folder_is_refused_with_the_holders_pid(tiny_base, tiny_dataset, tmp_path):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 1})
    train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    with ckpt.run_lock(tmp_path / "out" / "run"):  # what a running `lorakit train` holds
        with pytest.raises(OutputError, match=rf"in use by another lorakit train \(PID {os.getpid()}\)"):
            train(recipe_from_dict(recipe), overwrite=True, quiet=True, log=lambda _: None)
    assert (tmp_path / "out" / "run" / "run.safetensors").is_file()  # the running job's folder was not touched


def test_resume_refuses_another_optimizer_and_a_changed_dataset(tiny_base, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns(".cache"))
    recipe = make_recipe_dict(tiny_base, data, tmp_path / "out", train=dict(SMALL))
    train(recipe_from_dict({**recipe, "train": {**recipe["train"], "max_steps": 2}}), quiet=True, log=lambda _: None)
    other = {**recipe, "train": {**recipe["train"], "optimizer": "adafactor"}}
    with pytest.raises(OutputError, match="train.optimizer changed from 'adamw' to 'adafactor'"):
        train(recipe_from_dict(other), resume="latest", quiet=True, log=lambda _: None)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = "another caption"
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(OutputError, match="the dataset changed since step-000002"):
        train(recipe_from_dict(recipe), resume="latest", quiet=True, log=lambda _: None)


def test_resume_skips_a_damaged_newest_checkpoint_and_drops_a_torn_metrics_line(tiny_base, tiny_dataset, tmp_path):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={**SMALL, "keep_checkpoints": 2})
    train(recipe_from_dict({**recipe, "train": {**recipe["train"], "max_steps": 4}}), quiet=True, log=lambda _: None)
    run_dir = tmp_path / "out" / "run"
    newest = run_dir / "checkpoints" / "step-000004"
    data = bytearray((newest / "adapter.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the newest checkpoint
    (newest / "adapter.safetensors").write_bytes(bytes(data))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')
    (run_dir / ".run.safetensors.abc123.tmp").write_bytes(b"")  # what a kill during export leaves
    lines: list[str] = []
    extended = {**recipe, "train": {**recipe["train"], "max_steps": 6}}
    train(recipe_from_dict(extended), resume="latest", quiet=True, log=lines.append)
    text = "\n".join(lines)
    assert "skipped step-000004: adapter.safetensors does not match its recorded sha256" in text
    assert "Resumed from" in text and "step-000002" in text
    assert "dropped 1 damaged line(s) of metrics.jsonl" in text
    assert "removed 1 half-written files" in text
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def _stop_at(monkeypatch, step: int, action) -> None:
    original = loop.optimizer_step

    def stepping(run):
        loss = original(run)
        if run.step == step:
            action(run)
        return loss

    monkeypatch.setattr(loop, "optimizer_step", stepping)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_and_says_how_to_resume(tiny_base, tiny_dataset, tmp_path, monkeypatch, number):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={**SMALL, "save_every_steps": 0})
    default = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
    previous = signal.signal(number, default)  # as in a terminal (a background job may start with SIGINT ignored)
    _stop_at(monkeypatch, 3, lambda run: os.kill(os.getpid(), number))
    with pytest.raises(Interrupted) as caught:
        train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    assert caught.value.exit_code == 128 + number
    message = str(caught.value)
    assert f"{signal.Signals(number).name} at step 3 of 4: progress saved in" in message
    assert "--resume latest`" in message
    assert signal.getsignal(number) is default  # the handler put back
    signal.signal(number, previous)
    monkeypatch.undo()
    result = train(recipe_from_dict(recipe), resume="latest", quiet=True, log=lambda _: None)
    assert result.steps == 4


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_it_needs(
    tiny_base, tiny_dataset, tmp_path, monkeypatch
):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={**SMALL, "keep_checkpoints": 2})
    real = ckpt.save_file

    def full_disk_at_step_4(tensors, path, *args, **kwargs):
        if "step-000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk_at_step_4)
    with pytest.raises(OutputError) as caught:
        train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    message = str(caught.value)
    assert "could not write the checkpoint of step 4" in message and "No space left on device" in message
    assert "MiB free there; the checkpoint step-000002 is intact" in message and "--resume latest" in message
    kept = tmp_path / "out" / "run" / "checkpoints" / "step-000002"
    assert ckpt.checkpoint_problem(kept) is None
    needed = float(re.search(r"needs about ([\d.]+) MiB", message).group(1)) * 2**20
    written = sum(f.stat().st_size for f in kept.iterdir())
    assert 0.8 * written <= needed <= 1.25 * written, (needed, written)  # what the step before really wrote


def test_a_non_finite_adapter_is_never_saved(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train=dict(SMALL))

    def poison(run):
        with torch.no_grad():
            next(iter(run.named_trainable().values())).fill_(float("nan"))

    _stop_at(monkeypatch, 4, poison)  # after the step: its loss was finite, the weights are not
    with pytest.raises(LorakitError, match="adapter tensors hold NaN or infinity at step 4"):
        train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    run_dir = tmp_path / "out" / "run"
    assert not (run_dir / "run.safetensors").exists()
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-000002"]
    kept = load_file(run_dir / "checkpoints" / "step-000002" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_files_get_the_users_umask_not_0600(tiny_base, tiny_dataset, tmp_path):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 1})
    train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    run_dir = tmp_path / "out" / "run"
    for path in [run_dir / "run.safetensors", run_dir / "recipe.resolved.toml"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_current_umask(), path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_preflight_states_the_disk_a_run_needs_and_refuses_before_writing(
    tiny_base, tiny_dataset, tmp_path, monkeypatch
):
    import collections

    import lorakit.train.setup as setup

    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={"max_steps": 1})
    lines: list[str] = []
    train(recipe_from_dict(recipe), quiet=True, log=lines.append)
    assert any(line.startswith("Disk: about ") and "checkpoints" in line for line in lines)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(setup.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    recipe["output"]["name"] = "second"
    with pytest.raises(OutputError, match=r"need about .* MiB under .* but only 0.0 MiB is free there"):
        train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    assert not (tmp_path / "out" / "second").exists()


def test_an_ignored_sigint_stays_ignored(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    """A run started with SIGINT ignored (nohup, a background job) keeps ignoring it, as its caller asked."""
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "out", train={**SMALL, "save_every_steps": 0})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _stop_at(monkeypatch, 3, lambda run: os.kill(os.getpid(), signal.SIGINT))
        result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
        assert result.steps == 4 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
