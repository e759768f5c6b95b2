"""convert / inspect / merge / resize and single-file checkpoints, on adapters trained here and third-party ones."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.adapters import delta_weight
from lorakit.cli import app
from lorakit.formats.read import read_adapter_file

from .invoke import fails as _fails
from .invoke import ok as _ok
from .invoke import runner
from .invoke import sd_pipeline as _pipe

MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def third_party(trained_run, tmp_path_factory):
    """The trained adapter as other trainers ship it: fp16, no metadata, per-module alphas that differ."""
    tensors = load_file(trained_run.adapter)
    for index, key in enumerate(sorted(k for k in tensors if k.endswith(".alpha"))):
        tensors[key] = torch.tensor([1.0, 2.0, 8.0][index % 3])
    path = tmp_path_factory.mktemp("third") / "someone_elses_lora.safetensors"
    save_file({k: v.half() for k, v in tensors.items()}, str(path))
    return path


def _unet_output(unet):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(latents, torch.tensor([300]), encoder_hidden_states=hidden).sample


def test_kohya_diffusers_kohya_round_trip_is_identical(trained_run, tmp_path):
    diffusers_file = tmp_path / "a.diffusers.safetensors"
    back = tmp_path / "a.kohya.safetensors"
    _ok(["convert", str(trained_run.adapter), "--to", "diffusers", "--out", str(diffusers_file)])
    _ok(["convert", str(diffusers_file), "--to", "kohya", "--out", str(back)])
    original, again = load_file(trained_run.adapter), load_file(back)
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key
    with safe_open(back, "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4"  # metadata travels with the weights


def test_third_party_kohya_file_loads_through_our_reader_with_its_alphas(third_party, tiny_base, tmp_path):
    converted = tmp_path / "converted.safetensors"
    _ok(["convert", str(third_party), "--to", "diffusers", "--out", str(converted)])
    adapter = read_adapter_file(third_party)
    assert len({m.alpha for m in adapter.state["unet"].values()}) == 3
    expected = _pipe(tiny_base)
    from lorakit.merge import Weighted, merge_into_models

    merge_into_models(
        {"unet": expected.unet, "text_encoder": expected.text_encoder}, [Weighted(adapter.state, 1.0, "x")]
    )
    loaded = _pipe(tiny_base)
    loaded.load_lora_weights(str(converted))
    torch.testing.assert_close(_unet_output(loaded.unet), _unet_output(expected.unet), rtol=1e-4, atol=1e-4)
    info = json.loads(_ok(["inspect", str(third_party), "--json"]).stdout)
    assert info["layout"] == "kohya" and info["metadata"] == {}
    assert info["architecture"] == "unknown"  # no metadata, and a 32-wide text encoder is no real SD family
    assert info["components"]["unet"]["alphas"] == [1.0, 2.0, 8.0]


def test_inspect_reports_layout_ranks_and_metadata(trained_run):
    text = _ok(["inspect", str(trained_run.adapter)]).stdout
    assert "layout: kohya (loads in A1111/Forge, ComfyUI and diffusers)" in text
    assert "unet: 48 LoRA modules (0 3x3 conv), " in text and "parameters, rank 4, alpha 8" in text
    assert "text_encoder: 12 LoRA modules" in text
    assert "weights: all finite" in text and "ss_network_dim: 4" in text
    info = json.loads(_ok(["inspect", str(trained_run.diffusers_adapter), "--json"]).stdout)
    assert info["layout"] == "diffusers" and info["components"]["unet"]["modules"] == 48
    assert info["architecture"] == "sd1"  # from ss_base_model_version


def test_damaged_and_foreign_files_name_the_first_bad_key(trained_run, tiny_base_v, tmp_path):
    tensors = load_file(trained_run.adapter)
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    broken = dict(tensors)
    broken[f"{stem}.lora_up.weight"] = torch.full_like(tensors[f"{stem}.lora_up.weight"], float("nan"))
    save_file(broken, str(tmp_path / "nan.safetensors"))
    _fails(["inspect", str(tmp_path / "nan.safetensors")], f"{stem}.lora_down.weight: holds NaN or infinite values")
    save_file({**tensors, "lora_unet_x.hada_w1_a": torch.zeros(1)}, str(tmp_path / "loha.safetensors"))
    _fails(
        ["convert", str(tmp_path / "loha.safetensors"), "--to", "diffusers"],
        "lora_unet_x: a LoHa module without hada_w1_b and hada_w2_a and hada_w2_b",
    )
    torch.save(tensors, tmp_path / "old.pt")
    _fails(["inspect", str(tmp_path / "old.pt")], "--allow-pickle")
    assert "layout: kohya" in _ok(["inspect", str(tmp_path / "old.pt"), "--allow-pickle"]).stdout
    # An SD 1.x adapter (1x1-conv projections) onto an SD 2.x-style base (linear projections).
    _fails(
        ["merge", "--lora", str(trained_run.adapter), "--base", str(tiny_base_v), "--out", str(tmp_path / "m")],
        "does not fit the base weight",
    )


def test_merge_into_base_adds_the_scaled_update(trained_run, tiny_base, tmp_path):
    out = tmp_path / "merged"
    _ok(["merge", "--lora", f"{trained_run.adapter}:0.7", "--base", str(tiny_base), "--out", str(out)])
    base, merged = _pipe(tiny_base), _pipe(out)
    lora = read_adapter_file(trained_run.adapter).state["unet"][MODULE]
    weight = dict(base.unet.named_modules())[MODULE].weight
    expected = weight + delta_weight(lora, tuple(weight.shape), 0.7)
    torch.testing.assert_close(dict(merged.unet.named_modules())[MODULE].weight, expected, rtol=0, atol=1e-6)
    assert all(torch.isfinite(p).all() for p in merged.unet.parameters())
    fused = _pipe(tiny_base)
    fused.load_lora_weights(str(trained_run.diffusers_adapter))
    fused.fuse_lora(lora_scale=0.7)
    torch.testing.assert_close(_unet_output(merged.unet), _unet_output(fused.unet), rtol=1e-4, atol=1e-5)


def test_single_file_round_trip_and_training_on_it(trained_run, tiny_base, tiny_dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged.safetensors"
    _ok(["merge", "--lora", str(trained_run.adapter), "--base", str(tiny_base), "--out", str(out)])
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0") for k in keys)
    folder = tmp_path / "merged-folder"
    _ok(["merge", "--lora", str(trained_run.adapter), "--base", str(tiny_base), "--out", str(folder)])
    from_folder = _pipe(folder)
    from_file = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_base), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_folder, name).state_dict(), getattr(from_file, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    from .conftest import make_recipe_dict

    recipe = make_recipe_dict(
        out, tiny_dataset, tmp_path / "runs", model={"config": str(tiny_base)}, train={"max_steps": 1}
    )
    assert train(recipe_from_dict(recipe), quiet=True, log=lambda _: None).steps == 1
    # the messages name the options the command was given, not the recipe keys training reads
    without_config = ["merge", "--lora", str(trained_run.adapter), "--base", str(out), "--out", str(tmp_path / "x")]
    _fails(without_config, f"error: --config: {out} is a single-file SD 1.x/2.x checkpoint; give --config a diffusers")
    nope = tmp_path / "nope"
    _fails(
        ["merge", "--lora", str(trained_run.adapter), "--base", str(nope), "--out", str(tmp_path / "y")],
        f"--base: {nope} does not",
    )


def test_exact_adapter_merge_is_the_sum_of_the_effects(trained_run, third_party, tiny_base, tmp_path):
    out = tmp_path / "sum.safetensors"
    _ok(
        [
            "merge",
            "--lora",
            f"{trained_run.adapter}:1",
            "--lora",
            f"{third_party}:0.5",
            "--out",
            str(out),
            "--save-dtype",
            "float32",
        ]
    )
    merged = read_adapter_file(out).state
    first, second = read_adapter_file(trained_run.adapter).state, read_adapter_file(third_party).state
    for component, modules in merged.items():
        for path, lora in modules.items():
            shape = (lora.up.shape[0], *lora.down.shape[1:])
            want = delta_weight(first[component][path], shape) + delta_weight(second[component][path], shape, 0.5)
            torch.testing.assert_close(delta_weight(lora, shape), want, rtol=1e-5, atol=1e-6)
            assert lora.rank == 8
    loaded = _pipe(tiny_base)
    loaded.load_lora_weights(str(out))
    reference = _pipe(tiny_base)
    from lorakit.merge import Weighted, merge_into_models

    merge_into_models(
        {"unet": reference.unet, "text_encoder": reference.text_encoder},
        [Weighted(first, 1.0, "a"), Weighted(second, 0.5, "b")],
    )
    torch.testing.assert_close(_unet_output(loaded.unet), _unet_output(reference.unet), rtol=1e-4, atol=1e-5)


def test_svd_merge_reports_its_error(trained_run, third_party, tmp_path):
    def svd_merge(rank):
        args = ["merge", "--lora", str(trained_run.adapter), "--lora", str(third_party), "--rank", str(rank)]
        return runner.invoke(app, [*args, "--out", str(tmp_path / f"r{rank}.safetensors")])

    exact, lossy = svd_merge(8), svd_merge(1)
    assert exact.exit_code == 0 and "relative error 0.0000% overall" in exact.stderr
    assert lossy.exit_code == 0 and "SVD merge to rank 1: relative error" in lossy.stderr
    assert "relative error 0.0000% overall" not in lossy.stderr


def test_resize_to_full_rank_is_lossless_and_smaller_ranks_report_energy(trained_run, tmp_path):
    full = tmp_path / "r4.safetensors"
    result = runner.invoke(app, ["resize", str(trained_run.adapter), "--rank", "4", "--out", str(full)])
    assert result.exit_code == 0 and "100.0000% of the update's energy retained overall" in result.stderr
    original, resized = read_adapter_file(trained_run.adapter).state, read_adapter_file(full).state
    for component, modules in original.items():
        for path, lora in modules.items():
            shape = (lora.up.shape[0], *lora.down.shape[1:])
            torch.testing.assert_close(
                delta_weight(resized[component][path], shape), delta_weight(lora, shape), rtol=1e-4, atol=1e-6
            )
    small = runner.invoke(app, ["resize", str(trained_run.adapter), "--rank", "1", "--out", str(tmp_path / "r1")])
    assert small.exit_code == 0 and "Resized to rank 1:" in small.stderr
    assert read_adapter_file(tmp_path / "r1").state["unet"][MODULE].rank == 1


def test_merge_is_safe_to_rerun(trained_run, third_party, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["merge", "--lora", f"{trained_run.adapter}:1", "--lora", f"{third_party}:0.5", "--out", str(out)]
    _ok(args)
    written = out.stat().st_mtime_ns
    again = _ok(args)
    assert "up to date" in again.stderr and out.stat().st_mtime_ns == written
    changed = args[:4] + [f"{third_party}:0.25"] + args[5:]
    _fails(changed, "already exists and was not merged from these inputs")
    _ok(changed + ["--overwrite"])
    _fails(["merge", "--lora", str(third_party), "--out", str(third_party), "--overwrite"], "is one of the inputs")


def test_third_party_kohya_file_renders_through_generate(third_party, tiny_base, tmp_path):
    from PIL import Image

    from lorakit.render import parse_a1111_parameters

    args = ["generate", "ohwx toy", "--base", str(tiny_base), "--lora", f"{third_party}:0.5", "--size", "64x64"]
    _ok([*args, "--steps", "2", "--quiet", "--out", str(tmp_path)])
    with Image.open(tmp_path / "000-seed0.png") as image:
        assert "<lora:someone_elses_lora:0.5>" in parse_a1111_parameters(image.text["parameters"])["prompt"]


def test_an_sd2_single_file_holds_its_text_encoder_in_openclip_layout(tiny_base_v, tmp_path):
    """A1111 recognises an SD 2.x file, and ComfyUI finds its text encoder, only under `cond_stage_model.model.`
    in OpenCLIP's layout; diffusers and lorakit read it back weight for weight."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from lorakit.formats.single_file import to_single_file
    from lorakit.models import load_base

    folder = _pipe(tiny_base_v)
    out = tmp_path / "sd2.safetensors"
    models = {name: getattr(folder, name) for name in ("unet", "vae", "text_encoder")}
    save_file(to_single_file(models, v_prediction=True), str(out))
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.ln_final.weight" in keys and "cond_stage_model.model.positional_embedding" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    from_file = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_base_v), local_files_only=True)
    by_lorakit = load_base(str(out), config=str(tiny_base_v))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(from_file, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ours = by_lorakit.text_encoders[0].state_dict()
    assert all(torch.equal(ours[k], v) for k, v in folder.text_encoder.state_dict().items())
    assert by_lorakit.prediction_type == "v_prediction"


def test_a_half_precision_base_stays_half_precision_with_the_lora_baked_in(trained_run, tiny_base, tmp_path):
    """Baking a LoRA into a float16 checkpoint gives a float16 checkpoint (float32 doubled its size: 14 GB for SDXL),
    read without a float32 copy, each weight the float32 merge rounded once; `--save-dtype` still decides."""
    from diffusers import StableDiffusionPipeline

    from lorakit.formats.read import tensors_dtype
    from lorakit.formats.single_file import to_single_file
    from lorakit.merge import merge

    from .conftest import allocation_peak

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "half-folder")
    names = ("unet", "vae", "text_encoder")
    save_file(to_single_file({n: getattr(pipe, n) for n in names}), str(tmp_path / "half.safetensors"))
    held = sum(t.numel() * t.element_size() for n in names for t in getattr(pipe, n).state_dict().values())
    original = load_file(tmp_path / "half.safetensors")
    lora = [(str(trained_run.adapter), 0.7)]
    for base in (tmp_path / "half-folder", tmp_path / "half.safetensors"):
        said = []
        where = {"base": str(base), "config": str(tiny_base), "overwrite": True}
        reference = merge(lora, tmp_path / "ref.safetensors", save_dtype="float32", **where)
        peak = allocation_peak(lambda: merge(lora, tmp_path / "ours.safetensors", log=said.append, **where))  # noqa: B023
        assert any("writing float16 (as the base stores its weights" in line for line in said), said
        ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(reference.out)
        assert {v.dtype for v in ours.values() if v.is_floating_point()} == {torch.float16}, base.name
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours)
        assert any(not torch.equal(ours[k], original[k]) for k in ours)  # the LoRA is in
        assert peak < 1.5 * held, (base.name, peak / held)  # read and written in float32: 2.8x (3.1x the file)
    half_file = str(tmp_path / "half.safetensors")
    out = tmp_path / "bf16.safetensors"
    _ok(["merge", "--lora", lora[0][0], "--base", half_file, "--config", str(tiny_base), "--save-dtype", "bfloat16",
         "--out", str(out)])  # fmt: skip
    assert tensors_dtype(out) == "bfloat16"


def test_a_bases_stored_precision_is_read_from_its_header(tiny_base, tmp_path, monkeypatch):
    """What `merge --base` keeps by default: a single file's, a folder's U-Net's, a cached hub model's U-Net's
    precision (its variant files aside); a hub model not yet downloaded is unknown until it is read."""
    import huggingface_hub.constants

    from lorakit.models import base_dtype

    unet = {"w": torch.zeros(4, 4, dtype=torch.bfloat16)}
    assert base_dtype(str(tiny_base)) == "float32"
    save_file({"model.diffusion_model.w": unet["w"].half()}, str(tmp_path / "file.safetensors"))
    assert base_dtype(str(tmp_path / "file.safetensors")) == "float16"
    snapshot = tmp_path / "hub" / "models--someone--model" / "snapshots" / "0123abcd"
    (snapshot / "unet").mkdir(parents=True)
    save_file(unet, str(snapshot / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({"w": unet["w"].float()}, str(snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert base_dtype("someone/model") == "bfloat16"
    assert base_dtype("someone/other-model") is None
    sharded = tmp_path / "hub" / "models--someone--sharded" / "snapshots" / "4567cdef"
    (sharded / "unet").mkdir(parents=True)
    (sharded.parent.parent / "refs").mkdir()
    (sharded.parent.parent / "refs" / "main").write_text("4567cdef")
    index = {"weight_map": {"w": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert base_dtype("someone/sharded") is None  # the index is there, its shard not yet
    save_file({"w": unet["w"].half()}, str(sharded / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    assert base_dtype("someone/sharded") == "float16"
    folder = tmp_path / "folder"
    (folder / "unet").mkdir(parents=True)
    save_file({"w": unet["w"].float()}, str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    assert base_dtype(str(folder)) is None
    save_file(unet, str(folder / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    assert base_dtype(str(folder)) == "bfloat16"


def test_kept_rank_is_the_fewest_singular_values_holding_the_energy():
    from lorakit.adapters import kept_rank

    s = torch.tensor([3.0, 2.0, 1.0])  # squares 9, 4, 1 of 14
    assert [kept_rank(s, 3, e) for e in (0.5, 9 / 14, 0.65, 13 / 14, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert kept_rank(s, 2, 1.0) == 2 and kept_rank(s, 2) == 2 and kept_rank(s, 8) == 3
    assert kept_rank(torch.zeros(3), 3, 0.9) == 1


def test_resize_by_energy_picks_a_rank_per_module_that_loaders_accept(trained_run, tiny_base, tmp_path):
    out = tmp_path / "dynamic.safetensors"
    result = _ok(["resize", str(trained_run.adapter), "--rank", "4", "--energy", "0.6", "--out", str(out)])
    assert "Resized keeping 60.00% of each module's energy (rank at most 4): ranks 1 to" in result.stderr
    original, resized = read_adapter_file(trained_run.adapter).state, read_adapter_file(out).state
    ranks = set()
    for component, modules in original.items():
        for path, lora in modules.items():
            whole = delta_weight(lora, lora.shape).reshape(lora.shape[0], -1).double()
            s = torch.linalg.svd(whole).S ** 2
            rank = resized[component][path].rank
            ranks.add(rank)
            assert s[:rank].sum() >= 0.6 * s.sum() - 1e-9  # keeps the share ...
            assert rank == 1 or s[: rank - 1].sum() < 0.6 * s.sum()  # ... with no rank to spare
    assert len(ranks) > 1  # the modules differ
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"
    loaded = _pipe(tiny_base)
    loaded.load_lora_weights(str(out))
    reference = _pipe(tiny_base)
    from lorakit.merge import Weighted, merge_into_models

    merge_into_models({"unet": reference.unet, "text_encoder": reference.text_encoder}, [Weighted(resized, 1.0, "r")])
    torch.testing.assert_close(_unet_output(loaded.unet), _unet_output(reference.unet), rtol=1e-3, atol=1e-4)


def test_svd_merge_by_energy_chooses_a_rank_per_module(trained_run, third_party, tmp_path):
    out = tmp_path / "dynamic.safetensors"
    args = ["merge", "--lora", str(trained_run.adapter), "--lora", f"{third_party}:0.5", "--out", str(out)]
    result = _ok([*args, "--rank", "8", "--energy", "0.6"])
    assert "SVD merge to ranks 1 to " in result.stderr and "(60.00% kept)" in result.stderr
    ranks = {m.rank for modules in read_adapter_file(out).state.values() for m in modules.values()}
    assert max(ranks) <= 8 and len(ranks) > 1
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"
    for extra in (["--energy", "0.6"], ["--energy", "0.6", "--rank", "4", "--base", "x"]):
        result = runner.invoke(app, [*args[:-1], str(tmp_path / "no.safetensors"), *extra])
        assert result.exit_code == 2 and "--energy" in result.output and "give --rank" in result.output
    assert not (tmp_path / "no.safetensors").exists()


def test_a_run_on_merged_adapters_reloads_with_them_and_generate_merges_them_too(
    trained_run, sdxl_run, tiny_base, tiny_dataset, tmp_path
):
    """`model.merged_adapters` (kohya's base_weights): the new adapter learns on the base with the files merged in;
    diffusers, given the same files at their scales, draws what the trained model draws, and `generate` with the
    run folder merges them back by itself."""
    import hashlib

    import numpy as np
    from PIL import Image

    from lorakit.errors import AdapterError
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    from .conftest import make_recipe_dict

    def fingerprint(folder):  # the base's files: merging writes into weights read from them, never into them
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = fingerprint(tiny_base)
    first = trained_run.adapter
    sections = {"model": {"merged_adapters": [f"{first}:0.7"]}, "train": {"max_steps": 2}}
    lines: list[str] = []
    result = train(
        recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, **sections)), quiet=True, log=lines.append
    )
    assert any(
        line.startswith(f"model.merged_adapters: {first.name} x0.7 merged into the base (") for line in lines
    ), lines
    assert fingerprint(tiny_base) == before
    pipe = _pipe(tiny_base)
    pipe.load_lora_weights(str(first), adapter_name="first")
    with pytest.warns(UserWarning, match="Already found a `peft_config`"):  # a second adapter is what is wanted
        pipe.load_lora_weights(str(result.adapter), adapter_name="second")
    pipe.set_adapters(["first", "second"], [0.7, 1.0])
    torch.testing.assert_close(_unet_output(pipe.unet), _unet_output(result.models["unet"].eval()), rtol=0, atol=1e-5)

    def image(*args):
        out = tmp_path / f"render{len(list(tmp_path.glob('render*')))}"
        said = _ok(["generate", "a photo of ohwx", "--out", str(out), "--size", "64x64", "--steps", "3", *args])
        with Image.open(next(out.glob("*.png"))) as drawn:
            return np.asarray(drawn).astype(int), said.output

    run_folder, base_args = str(result.run_dir), ["--base", str(tiny_base)]
    merged, said = image("--lora", run_folder)
    assert f"The run's model.merged_adapters: {first.name} x0.7 merged into the base" in said
    by_hand, _ = image(*base_args, "--lora", f"{first}:0.7", "--lora", str(result.adapter))
    alone, _ = image(*base_args, "--lora", str(result.adapter))
    assert np.abs(merged - by_hand).max() <= 2  # merged weights against runtime LoRA: rounding only
    assert np.abs(merged - alone).mean() > 5 * max(np.abs(merged - by_hand).mean(), 0.1)

    # an adapter that is not there, or is for another architecture, is refused before the run folder is made
    for entry, fragment in (
        (str(tmp_path / "none.safetensors"), "model.merged_adapters: " + str(tmp_path / "none.safetensors")),
        (str(sdxl_run[0].adapter), "is an SDXL adapter but the base is an SD 1.x model"),
    ):
        sections = {"model": {"merged_adapters": [entry]}}
        with pytest.raises(AdapterError, match=re.escape(fragment)):
            train(
                recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "refused", **sections)),
                quiet=True,
                log=lambda _: None,
            )
        assert not (tmp_path / "refused").exists()
