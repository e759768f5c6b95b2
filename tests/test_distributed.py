"""The same `train` under torchrun: two gloo processes, disjoint data shards, one writer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import make_recipe_dict, write_recipe


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
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
            # and module dropout: a module idle for a step is skipped on both processes alike
            lora={"train_text_encoder": True, "module_dropout": 0.3},
            model={"clip_skip": 2},
        ),
    )
    records = tmp_path / "records"
    records.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "tests/dist_driver.py",
        str(recipe),
        str(records),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world"], r["dist_world"], r["backend"]) for r in ranks] == [(2, 2, "gloo")] * 2
    by_epoch = [{}, {}]
    for rank, record in enumerate(ranks):
        for epoch, paths in record["seen"]:
            by_epoch[rank].setdefault(epoch, set()).update(paths)
    for epoch in by_epoch[0]:
        assert by_epoch[0][epoch] and by_epoch[1][epoch]
        assert not by_epoch[0][epoch] & by_epoch[1][epoch], f"epoch {epoch} shards overlap"
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were all-reduced
    run = tmp_path / "out" / "run"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert {p.name for p in run.iterdir()} >= {"run.safetensors", "run.diffusers.safetensors"}
    assert done.stdout.splitlines().count(str(run / "run.safetensors")) == 1  # printed by the writer alone
