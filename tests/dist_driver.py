"""Run under `torchrun --nproc_per_node 2`: trains a recipe and records what this process saw.

Usage: torchrun --nproc_per_node 2 tests/dist_driver.py RECIPE OUT_DIR (runs `lorakit train RECIPE --quiet`)
"""

import hashlib
import json
import os
import sys

import lorakit.train as train_module
import lorakit.train.setup as setup_module
from lorakit.cli import app
from lorakit.data import BatchStream

seen: list[list[int]] = []
setup: dict[str, object] = {}


class RecordingStream(BatchStream):
    def next(self):
        import torch.distributed as dist

        setup.update(world=self.world, backend=dist.get_backend(), dist_world=dist.get_world_size())
        batch = super().next()
        seen.append([self.epoch, [str(self.items[i].path) for i in batch]])
        return batch


setup_module.BatchStream = RecordingStream  # where set_up builds the run's stream
finished = []
real_train = train_module.train


def recording_train(*args, **kwargs):
    finished.append(real_train(*args, **kwargs))
    return finished[-1]


train_module.train = recording_train  # `lorakit train` imports it when it runs
app(["train", sys.argv[1], "--quiet"], standalone_mode=False)
result = finished[0]

digest = hashlib.sha256()
for name, param in sorted(result.models["unet"].named_parameters()):
    if "lora_" in name:
        digest.update(param.detach().numpy().tobytes())
rank = int(os.environ["RANK"])
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as out:
    json.dump({**setup, "seen": seen, "weights": digest.hexdigest()}, out)
