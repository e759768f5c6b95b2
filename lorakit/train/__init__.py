"""`train(recipe)`: set the run up, fit it, export it.

`setup` loads the base, the items and the adapters and fills the caches; `loop` takes the optimizer steps
(with checkpoints, validation and exact resume); `images` renders samples and class images; the exported files
and their metadata are `lorakit.formats`'. The run folder's layout is `lorakit.checkpoint.RunPaths`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_failure
from ..errors import LorakitError, OutputError
from ..formats.files import save_adapter_files
from ..formats.metadata import training_info
from ..lycoris import KIND_NAMES
from ..memory import adapter_bytes
from ..recipe import Recipe
from .loop import Log, Run, adapter_state, check_finite_adapter, embedding_only, fit, save_embedding
from .setup import process_switches_kept, resolve_recipe, run_paths, set_up

__all__ = ["RunResult", "resolve_recipe", "run_paths", "train"]


@dataclass
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    adapter: Path
    diffusers_adapter: Path | None  # None for LoKr/LoHa (no diffusers layout)
    steps: int
    final_loss: float
    trainable_parameters: int
    models: dict[str, Any]  # the trained modules (with their peft adapters), by component name
    startup: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase up to the first step
    wrote: bool = True  # this process wrote the files (under torchrun only the main process does)
    embedding: Path | None = None  # [embedding]: the textual-inversion file written beside the adapter


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    quiet: bool = False,
    verbose: bool = False,
    strict_memory: bool = False,
    log: Log = print,
) -> RunResult:
    """Train the LoRA described by `recipe` and write its run folder (docs/ARCHITECTURE.md has the layout).

    `resume` is `"latest"` or a checkpoint folder of the same run folder; `verbose` logs the start-up phases;
    `strict_memory` refuses a run that `lorakit plan` says will not fit this GPU (otherwise a warning).
    """
    started = datetime.now(UTC)
    with process_switches_kept(), contextlib.ExitStack() as held:
        try:
            run = set_up(
                recipe,
                overwrite=overwrite,
                resume=resume,
                quiet=quiet,
                log=log,
                hold=held.enter_context,
                strict_memory=strict_memory,
            )
            run.verbose, run.started = verbose, started
            loss = fit(run)
            return export(run, loss, started)
        except torch.OutOfMemoryError as err:
            raise LorakitError(out_of_memory_message(recipe, str(err))) from None
        except OSError as err:  # a write the specific handlers do not cover (metrics, the resolved recipe)
            raise OutputError(
                f"output: I/O error on {err.filename or 'a run file'}: {err.strerror or err}; the newest checkpoint "
                f"is intact: fix the cause, then `lorakit train {recipe.source} --resume latest`"
            ) from None


def out_of_memory_message(recipe: Recipe, detail: str) -> str:
    """One line: the GPU ran out of memory, and the recipe changes that lower it, cheapest in quality first."""
    cfg, model = recipe.train, recipe.model
    knobs = [
        ("train.cache_latents = true", not cfg.cache_latents),
        ("lora.train_text_encoder = false", recipe.lora.train_text_encoder is not False),
        ("train.gradient_checkpointing = true", not cfg.gradient_checkpointing),
        ('train.optimizer = "adamw8bit"', cfg.optimizer != "adamw8bit"),
        ('model.weight_dtype = "bfloat16" with train.mixed_precision = "bf16"', model.weight_dtype == "float32"),
        ('model.weight_dtype = "float8"', model.weight_dtype != "float8" and not recipe.lora.use_dora),
        (
            f"train.batch_size = {max(1, cfg.batch_size // 2)} with gradient_accumulation_steps = "
            f"{cfg.gradient_accumulation_steps * 2}",
            cfg.batch_size > 1,
        ),
        (f"lora.rank = {max(1, recipe.lora.rank // 2)}", recipe.lora.rank > 4),
        (f"data.resolution = {recipe.data.resolution * 3 // 4 // 64 * 64 or 64}", recipe.data.resolution > 512),
    ]
    advice = "; ".join(knob for knob, applies in knobs if applies) or "a GPU with more memory"
    where = detail.split(". ")[0].strip()
    return f"the GPU ran out of memory ({where}); lower it with, in order: {advice}"


def export(run: Run, loss: float, started: datetime) -> RunResult:
    """Write the adapter files (the EMA weights where the recipe keeps an EMA) and say where they are."""
    recipe, paths = run.recipe, run.paths
    if embedding_only(recipe):
        return _export_embedding(run, loss)
    models = run.unwrapped()
    state = adapter_state(run)
    kohya_path = None if recipe.lora.use_dora else paths.kohya_adapter
    diffusers_path = None if recipe.lora.type != "lora" else paths.diffusers_adapter
    if run.accelerator.is_main_process:
        check_finite_adapter(run)
        timesteps = run.base.noise_scheduler.config.num_train_timesteps
        info = training_info(recipe, run.base.family, run.items, run.step, started, timesteps, epoch=run.epochs_done)
        try:
            kohya_path, diffusers_path = save_adapter_files(
                state, paths.folder, recipe.output.name, recipe.output.save_dtype, info
            )
        except OSError as err:
            needed = adapter_bytes(recipe, [t.numel() for t in run.named_trainable().values()])
            raise write_failure(err, paths.folder, "the adapter files", needed, recipe.source) from None
        if kohya_path is None:
            run.log(f"Saved {diffusers_path} (DoRA, diffusers layout: diffusers and `lorakit generate`/`merge`)")
        elif diffusers_path is None:
            run.log(
                f"Saved {kohya_path} ({KIND_NAMES[recipe.lora.type]}, LyCORIS kohya layout: A1111/Forge, ComfyUI and "
                "`lorakit generate`/`merge`; diffusers cannot load LoKr/LoHa)"
            )
        else:
            run.log(f"Saved {kohya_path} (kohya layout: A1111/Forge, ComfyUI, diffusers) and {diffusers_path.name}")
        embedding = save_embedding(run)
        if embedding is not None:
            run.log(
                f"Saved {embedding} (textual inversion: use it with the adapter; the webuis read it as the word "
                f"{embedding.stem!r} from their embeddings folder, diffusers with load_textual_inversion)"
            )
    if run.device.type == "cuda" and run.planned_gib is not None:
        measured = torch.cuda.max_memory_allocated(run.device) / 2**30
        run.log(
            f"GPU memory: the training steps peaked at {measured:.2f} GiB allocated; lorakit plan estimated "
            f"{run.planned_gib:.2f} GiB"
        )
    run.accelerator.end_training()
    trainable = sum(p.numel() for p in run.named_trainable().values())
    startup = dict(run.phases.seconds) if run.phases is not None else {}
    return RunResult(
        paths.folder,
        kohya_path or diffusers_path,
        diffusers_path,
        run.step,
        loss,
        trainable,
        models,
        startup,
        wrote=run.accelerator.is_main_process,
        embedding=run.paths.embedding(recipe.embedding.token) if run.embeddings else None,
    )


def _export_embedding(run: Run, loss: float) -> RunResult:
    """`embedding.only`: the textual-inversion file is the run's result; no adapter files are written."""
    path = run.paths.embedding(run.recipe.embedding.token)
    if run.accelerator.is_main_process:
        check_finite_adapter(run)
        try:
            save_embedding(run)
        except OSError as err:
            raise write_failure(err, run.paths.folder, "the embedding file", 1 << 20, run.recipe.source) from None
        run.log(
            f"Saved {path} (textual inversion: the webuis read it as the word {path.stem!r} from their embeddings "
            "folder, diffusers with load_textual_inversion, `lorakit generate` with --embedding or the run folder)"
        )
    run.accelerator.end_training()
    trainable = sum(p.numel() for p in run.named_trainable().values())
    startup = dict(run.phases.seconds) if run.phases is not None else {}
    return RunResult(
        run.paths.folder,
        path,
        None,
        run.step,
        loss,
        trainable,
        run.unwrapped(),
        startup,
        wrote=run.accelerator.is_main_process,
        embedding=path,
    )
