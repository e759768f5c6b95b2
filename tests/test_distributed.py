"""The same `train` under torchrun: two gloo processes, disjoint data shards, one writer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_recipe_dict, write_recipe

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")


def _torchrun(recipe: Path, records: Path, port: int, env: dict | None = None) -> tuple[list[dict], str]:
    """`lorakit train RECIPE` on two processes; what each recorded (tests/dist_driver.py), and the stdout."""
    records.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "tests/dist_driver.py",
        str(recipe),
        str(records),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world"], r["dist_world"], r["backend"]) for r in ranks] == [(2, 2, "gloo")] * 2
    return ranks, done.stdout


def _shards_are_disjoint(ranks: list[dict]) -> None:
    by_epoch = [{}, {}]
    for rank, record in enumerate(ranks):
        for epoch, paths in record["seen"]:
            by_epoch[rank].setdefault(epoch, set()).update(paths)
    for epoch in by_epoch[0]:
        assert by_epoch[0][epoch] and by_epoch[1][epoch]
        assert not by_epoch[0][epoch] & by_epoch[1][epoch], f"epoch {epoch} shards overlap"


def test_two_processes_shard_the_data_and_one_writes(tiny_base, tiny_dataset, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.toml",
        make_recipe_dict(
            tiny_base,
            tiny_dataset,
            tmp_path / "out",
            train={"max_steps": 3, "save_every_steps": 2},
            # a trained text encoder with clip skip: the skipped layer must carry no adapter (DDP refuses
            # parameters without a gradient) and the final norm must be found through the DDP wrapper
            # and module dropout: a module idle for a step is skipped on both processes alike; and [preservation],
            # whose class captions share the step's one forward pass through the DDP-wrapped U-Net and text encoder;
            # and float8 frozen weights, which every process stores alike and gloo cannot broadcast
            lora={"train_text_encoder": True, "module_dropout": 0.3},
            model={"clip_skip": 2, "weight_dtype": "float8"},
            preservation={"class_word": "toy"},
        ),
    )
    ranks, stdout = _torchrun(recipe, tmp_path / "records", 29531)
    _shards_are_disjoint(ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were all-reduced
    run = tmp_path / "out" / "run"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert {p.name for p in run.iterdir()} >= {"run.safetensors", "run.diffusers.safetensors"}
    assert stdout.splitlines().count(str(run / "run.safetensors")) == 1  # printed by the writer alone


def test_two_processes_train_one_embedding(tiny_base, tiny_dataset, tmp_path):
    """Textual inversion on two processes: the text encoder is frozen, so no DDP wrapper shares the new vectors'
    gradients; lorakit averages them, and both processes end with the same vectors (apart, each would follow its
    own shard). And `train.save_every_minutes` with clocks that disagree (only the first process's moves): the
    first one's decides, so both take part in the same checkpoints (apart, they would wait on each other forever)."""
    sections = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        tmp_path / "out",
        train={"max_steps": 3, "save_every_minutes": 1},
        embedding={"token": "ohwx", "vectors": 2, "init_words": "toy", "lr": 1e-2, "only": True},
    )
    sections.pop("lora", None)
    for key in ("unet_lr", "text_encoder_lr"):
        sections["train"].pop(key, None)
    uneven = {"LORAKIT_TEST_UNEVEN_CLOCKS": "1"}
    ranks, stdout = _torchrun(write_recipe(tmp_path / "r.toml", sections), tmp_path / "records", 29532, uneven)
    _shards_are_disjoint(ranks)
    assert ranks[0]["initial_vectors"] == ranks[1]["initial_vectors"]  # the same start on both
    assert ranks[0]["vectors"] != ranks[0]["initial_vectors"]  # they learned
    assert ranks[0]["vectors"] == ranks[1]["vectors"]  # and the same
    written = tmp_path / "out" / "run" / "embeddings" / "ohwx.safetensors"
    assert written.is_file() and stdout.splitlines() == [str(written)]  # printed by the writer alone
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000001", "step-000002", "step-000003"]  # two timed ones, then the end's


def test_two_processes_train_one_slider(tiny_base, tmp_path):
    """A [slider] on two processes: each draws its own latents, DDP averages the gradients of both strengths' halves
    (the U-Net's and the text encoder's adapters, under gradient checkpointing, in bfloat16 with train.full_bf16: gloo
    reduces bfloat16 gradients), and both end with the same adapter: the steps are rounded stochastically with the
    same random bits on both, and the float32 stand-ins leave the hooks DDP reduces through in place."""
    from .test_slider import slider_recipe

    sections = slider_recipe(
        tiny_base,
        tmp_path / "out",
        train={"max_steps": 2, "gradient_checkpointing": True, "mixed_precision": "bf16", "full_bf16": True},
        lora={"train_text_encoder": True},
    )
    ranks, _ = _torchrun(write_recipe(tmp_path / "r.toml", sections), tmp_path / "records", 29533)
    assert ranks[0]["first_latents"] != ranks[1]["first_latents"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    rows = (tmp_path / "out" / "slider" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]
