"""Run under `torchrun --nproc_per_node 2`: trains a recipe and records what this process saw.

Usage: torchrun --nproc_per_node 2 tests/dist_driver.py RECIPE OUT_DIR (runs `lorakit train RECIPE --quiet`); each
process writes OUT_DIR/rank<N>.json: the batches it drew, and digests of its U-Net adapter and [embedding] vectors.
"""

import hashlib
import json
import os
import sys

import lorakit.slider as slider_module
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


class RecordingNoImages(slider_module.NoImages):  # a [slider]'s stream
    def next(self):
        import torch.distributed as dist

        setup.update(world=dist.get_world_size(), backend=dist.get_backend(), dist_world=dist.get_world_size())
        return super().next()


setup_module.NoImages = RecordingNoImages
real_denoise = slider_module.partial_denoise


def recording_denoise(*args, **kwargs):
    """A [slider]'s first noisy latents on this process."""
    latents, timestep = real_denoise(*args, **kwargs)
    setup.setdefault("first_latents", hashlib.sha256(latents.cpu().numpy().tobytes()).hexdigest())
    return latents, timestep


slider_module.partial_denoise = recording_denoise
finished = []
real_train = train_module.train


def recording_train(*args, **kwargs):
    finished.append(real_train(*args, **kwargs))
    return finished[-1]


train_module.train = recording_train  # `lorakit train` imports it when it runs
real_set_up = train_module.set_up


def vectors_digest(run) -> str:
    """The [embedding]'s new token vectors, every text encoder's."""
    digest = hashlib.sha256()
    for name, module in sorted(run.embeddings.items()):
        digest.update(name.encode() + module.vectors.detach().numpy().tobytes())
    return digest.hexdigest()


def recording_set_up(*args, **kwargs):
    runs.append(real_set_up(*args, **kwargs))
    setup["initial_vectors"] = vectors_digest(runs[-1])
    return runs[-1]


runs = []
train_module.set_up = recording_set_up
if os.environ.get("LORAKIT_TEST_UNEVEN_CLOCKS"):  # train.save_every_minutes: only the first process sees time pass
    import lorakit.train.loop as loop_module

    ticks = [0.0]

    def uneven_clock() -> float:
        if os.environ["RANK"] == "0":
            ticks[0] += 100.0
        return ticks[0]

    loop_module.now = uneven_clock
app(["train", sys.argv[1], "--quiet"], standalone_mode=False)
result = finished[0]

digest = hashlib.sha256()
for name, param in sorted(result.models["unet"].named_parameters()):
    if "lora_" in name:
        digest.update(param.detach().float().numpy().tobytes())  # bfloat16 (train.full_bf16) exactly too
rank = int(os.environ["RANK"])
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as out:
    record = {**setup, "seen": seen, "weights": digest.hexdigest(), "vectors": vectors_digest(runs[0])}
    json.dump(record, out)
