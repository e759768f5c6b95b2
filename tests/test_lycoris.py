"""LoKr and LoHa: peft's update equals lorakit's; exported files apply in the `lycoris-lora` package exactly as the
trained model; third-party LyCORIS files go through inspect, convert, merge, resize and generate; LoRA+."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict

runner = CliRunner()


class Layers(torch.nn.Module):
    """One module of each target type, wide enough that rank 2 decomposes every Kronecker factor."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 128)
        self.pointwise = torch.nn.Conv2d(64, 128, 1)
        self.conv = torch.nn.Conv2d(64, 128, 3, padding=1)


@pytest.mark.parametrize(
    ("kind", "options", "stored"),
    [
        ("lokr", {}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
        (
            "lokr",
            {"decompose_both": True, "decompose_factor": 16},
            {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
        ),
        ("lokr", {"use_effective_conv2d": True}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
        ("lokr", {"r": 10000}, {"lokr_w1", "lokr_w2"}),  # full rank: both factors whole, scale folded into w1
        ("loha", {}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
        (
            "loha",
            {"use_effective_conv2d": True},
            {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
        ),
    ],
    ids=["lokr", "lokr-both-factor16", "lokr-tucker", "lokr-full", "loha", "loha-tucker"],
)
def test_the_update_lorakit_computes_is_the_one_peft_applies(kind, options, stored):
    from peft import inject_adapter_in_model

    from lorakit import lycoris

    torch.manual_seed(0)
    model = Layers()
    config = lycoris.peft_config(
        kind, **{"r": 2, "alpha": 3.0, "target_modules": ["linear", "pointwise", "conv"], **options}
    )
    inject_adapter_in_model(config, model, adapter_name="default")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if lycoris.is_parameter(name):
                param.normal_(std=0.3)  # peft starts one factor at zero; any values will do here
    modules = lycoris.extract(model, "default", {})
    sample = {"linear": torch.randn(3, 64), "pointwise": torch.randn(1, 64, 5, 5), "conv": torch.randn(1, 64, 5, 5)}
    for name in ("linear", "pointwise", "conv"):
        layer = getattr(model, name)
        theirs = layer.get_delta_weight("default")
        torch.testing.assert_close(modules[name].delta(), theirs, rtol=1e-5, atol=1e-6)
        # and peft's forward pass is the base weight plus that update
        base = layer.get_base_layer()
        weight = base.weight + modules[name].delta()
        expected = (
            torch.nn.functional.linear(sample[name], weight, base.bias)
            if name == "linear"
            else torch.nn.functional.conv2d(sample[name], weight, base.bias, padding=base.padding)
        )
        torch.testing.assert_close(layer(sample[name]), expected, rtol=1e-4, atol=1e-5)
    assert set(modules["conv"].tensors) == stored, set(modules["conv"].tensors)
    if options.get("r") == 10000:
        assert modules["linear"].dim is None and modules["linear"].scale == 1.0  # the webuis' scale 1


def _run(tiny_base, tiny_dataset, out, **lora):
    recipe = make_recipe_dict(
        tiny_base,
        tiny_dataset,
        out,
        lora={"rank": 2, "lora_alpha": 3.0, "target_modules": "transformer+conv", **lora},
        train={"max_steps": 3, "unet_lr": 1e-2, "text_encoder_lr": 1e-2},
    )
    lines: list[str] = []
    return train(recipe_from_dict(recipe), quiet=True, log=lines.append), lines


@pytest.fixture(
    scope="module",
    params=[{"type": "lokr"}, {"type": "loha", "use_effective_conv2d": True}],
    ids=["lokr", "loha-tucker"],
)
def lycoris_run(request, tiny_base, tiny_dataset, tmp_path_factory):
    return _run(tiny_base, tiny_dataset, tmp_path_factory.mktemp("lycoris"), **request.param)


class _TextModel(torch.nn.Module):
    """transformers 5 dropped CLIPTextModel's `text_model` level; kohya/LyCORIS names still have it."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_model = text_encoder


def _webui_merged(path, base):
    """The base's U-Net and text encoder with the file merged as ComfyUI does it, restated here independently of
    lorakit: comfy/weight_adapter/lokr.py and loha.py (`calculate_weight`). Kohya names are matched the way
    kohya and LyCORIS match them: `lora_unet_` / `lora_te_` + the module path with "." turned into "_"."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    tensors = load_file(str(path))
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, name = key.partition(".")
        stems.setdefault(stem, {})[name] = value.float()
    merged = 0
    for prefix, model in (("lora_unet", pipe.unet), ("lora_te", _TextModel(pipe.text_encoder))):
        for name, module in model.named_modules():
            v = stems.get(f"{prefix}_{name.replace('.', '_')}")
            if v is None:
                continue
            with torch.no_grad():
                module.weight += _comfyui_diff(v, module.weight.shape)
            merged += 1
    assert merged == len(stems)
    return pipe


def _comfyui_diff(v: dict, shape) -> torch.Tensor:
    alpha = v["alpha"].item() if "alpha" in v else None
    if "hada_w1_a" in v:  # LoHa: alpha / w1_b rows, Tucker cores contracted with their factors
        scale = alpha / v["hada_w1_b"].shape[0] if alpha is not None else 1.0
        if "hada_t1" in v:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", v["hada_t1"], v["hada_w1_b"], v["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", v["hada_t2"], v["hada_w2_b"], v["hada_w2_a"])
        else:
            m1, m2 = v["hada_w1_a"] @ v["hada_w1_b"], v["hada_w2_a"] @ v["hada_w2_b"]
        return (scale * m1 * m2).reshape(shape)
    dim = None  # LoKr: alpha / the decomposed factor's rows, 1 when both factors are whole
    w1 = v.get("lokr_w1")
    if w1 is None:
        dim, w1 = v["lokr_w1_b"].shape[0], v["lokr_w1_a"] @ v["lokr_w1_b"]
    w2 = v.get("lokr_w2")
    if w2 is None:
        dim = v["lokr_w2_b"].shape[0]
        if "lokr_t2" in v:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", v["lokr_t2"], v["lokr_w2_b"], v["lokr_w2_a"])
        else:
            w2 = v["lokr_w2_a"] @ v["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2.contiguous()).reshape(shape)


def _outputs(unet, text_encoder):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    ids = torch.randint(0, 100, (1, 77), generator=generator)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        return hidden, unet(sample, torch.tensor([500]), encoder_hidden_states=hidden).sample


def test_a_trained_file_applies_in_the_lycoris_package_as_the_trained_model(lycoris_run, tiny_base, tmp_path):
    result, lines = lycoris_run
    kind = json.loads(safe_open(str(result.adapter), "pt").metadata()["ss_network_args"])["algo"]
    assert result.diffusers_adapter is None and not list(result.run_dir.glob("*.diffusers.safetensors"))
    with safe_open(str(result.adapter), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    prefix = "lokr_" if kind == "lokr" else "hada_"
    assert {k.split(".", 1)[1] for k in keys} - {"alpha"} <= {
        f"{prefix}{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t1", "t2")
    }
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any("resnets_0_conv1." in k for k in keys)  # the 3x3 convs too (transformer+conv)
    assert any(f"{'LoKr' if kind == 'lokr' else 'LoHa'} modules: unet" in line for line in lines)

    trained = _outputs(result.models["unet"], result.models["text_encoder"])
    pipe = _webui_merged(result.adapter, tiny_base)
    theirs = _outputs(pipe.unet, pipe.text_encoder)
    for ours, other in zip(trained, theirs, strict=True):
        torch.testing.assert_close(other, ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(trained[1], _outputs(*_base_models(tiny_base))[1], atol=1e-4)  # it learned something

    out = tmp_path / "merged"
    assert (
        runner.invoke(
            app, ["merge", "--lora", str(result.adapter), "--base", str(tiny_base), "--out", str(out)]
        ).exit_code
        == 0
    )
    from diffusers import StableDiffusionPipeline

    merged = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    for ours, other in zip(trained, _outputs(merged.unet, merged.text_encoder), strict=True):
        torch.testing.assert_close(other, ours, rtol=1e-4, atol=1e-5)


def _base_models(base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    return pipe.unet, pipe.text_encoder


@pytest.fixture(scope="module")
def third_party(tiny_base, tmp_path_factory):
    """A LoKr file written by the `lycoris-lora` package itself (kohya names), random weights, and the outputs of
    the package's own forward pass with it. Alpha equals the dim (scale 1): lycoris-lora 4.1.3 multiplies a LoKr
    module's alpha / dim in twice (`get_weight` and `get_diff_weight`), where ComfyUI, A1111 and peft apply it once."""
    from diffusers import StableDiffusionPipeline
    from lycoris.kohya import create_network

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None, requires_safety_checker=False)
    wrapped = _TextModel(pipe.text_encoder)
    torch.manual_seed(3)
    # Its own targets, written out: the default preset also names diffusers' time embedding twice (by class, for
    # another model, and by name) and then refuses the duplicate.
    preset = tmp_path_factory.mktemp("preset") / "sd.toml"
    preset.write_text(
        'unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]\n'
        "unet_target_name = []\n"
        'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n'
        "text_encoder_target_name = []\n"
    )
    network = create_network(
        1.0, 2, 2.0, None, wrapped, pipe.unet, algo="lokr", factor=4, conv_dim=2, conv_alpha=2.0, preset=str(preset)
    )
    network.apply_to(wrapped, pipe.unet, True, True)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(std=0.2)
    path = tmp_path_factory.mktemp("lycoris") / "third-party-lokr.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    outputs = _outputs(pipe.unet, pipe.text_encoder)  # the network is applied: forward passes go through it
    return path, outputs


def test_a_third_party_lokr_file_inspects_converts_merges_resizes_and_generates(third_party, tiny_base, tmp_path):
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from lorakit.convert import inspect_adapter
    from lorakit.formats.read import read_adapter_file

    path, applied = third_party
    info = inspect_adapter(path)
    assert info["components"]["unet"]["type"] == "lokr" and info["components"]["unet"]["parameters"] > 0
    shown = runner.invoke(app, ["inspect", str(path)])
    assert shown.exit_code == 0 and "LoKr modules" in shown.output and "not in diffusers" in shown.output

    half = tmp_path / "half.safetensors"
    converted = runner.invoke(app, ["convert", str(path), "--to", "kohya", "--out", str(half)])
    assert converted.exit_code == 0, converted.output
    before, after = read_adapter_file(path).state, read_adapter_file(half).state
    assert before.keys() == after.keys()
    for component, modules in before.items():
        assert modules.keys() == after[component].keys()
        for name, module in modules.items():
            torch.testing.assert_close(after[component][name].delta(), module.delta())
    refused = runner.invoke(app, ["convert", str(path), "--to", "diffusers", "--out", str(tmp_path / "d.safetensors")])
    assert refused.exit_code == 2 and "has no diffusers layout" in refused.output

    out = tmp_path / "merged"
    assert (
        runner.invoke(app, ["merge", "--lora", str(path), "--base", str(tiny_base), "--out", str(out)]).exit_code == 0
    )
    merged = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    for ours, theirs in zip(_outputs(merged.unet, merged.text_encoder), applied, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    small = tmp_path / "r2.safetensors"
    resized = runner.invoke(app, ["resize", str(path), "--rank", "2", "--out", str(small)])
    assert resized.exit_code == 0 and "LoKr -> LoRA rank 2: relative error" in resized.output
    lora = read_adapter_file(small)
    assert {m.rank for modules in lora.state.values() for m in modules.values()} == {2}
    exact = runner.invoke(app, ["resize", str(path), "--rank", "64", "--out", str(tmp_path / "r64.safetensors")])
    assert "relative error 0.0000%" in exact.output  # every factor fits in rank 64 here: the LoRA is exact

    images = {}
    for name, extra in (("base", []), ("lokr", ["--lora", str(path)])):
        args = ["generate", "a photo", "--base", str(tiny_base), *extra, "--size", "64x64", "--steps", "2", "--quiet"]
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        with Image.open(next((tmp_path / name).glob("*.png"))) as image:
            images[name] = np.asarray(image)
    assert not np.array_equal(images["base"], images["lokr"])


def test_lokr_merges_with_other_adapters_only_into_a_plain_lora(third_party, trained_run, tmp_path):
    path, _ = third_party
    args = ["merge", "--lora", str(path), "--lora", str(trained_run.adapter)]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "m.safetensors")])
    assert refused.exit_code == 2 and "merges with others only into a plain LoRA" in refused.output
    done = runner.invoke(app, [*args, "--rank", "4", "--out", str(tmp_path / "m.safetensors")])
    assert done.exit_code == 0 and "SVD merge to rank 4: relative error" in done.output


@pytest.mark.parametrize(
    ("suffix", "algorithm"),
    [
        ("on_input", "IA3"),
        ("a1.weight", "GLoRA"),
        ("oft_blocks", "OFT/BOFT"),
        ("diff", r"full \(diff\)"),
        ("dora_scale", "DoRA"),
    ],
)
def test_other_lycoris_algorithms_are_refused_naming_them(tmp_path, suffix, algorithm):
    from safetensors.torch import save_file

    from lorakit.formats.read import read_adapter_file

    path = tmp_path / "other.safetensors"
    save_file({f"lora_unet_mid_block_attentions_0_proj_in.{suffix}": torch.zeros(4)}, str(path))
    with pytest.raises(LorakitError, match=f"a LyCORIS {algorithm}.* module; lorakit reads LoRA, LoKr and LoHa"):
        read_adapter_file(path)


@pytest.mark.parametrize(
    ("lora", "train", "message"),
    [
        ({"decompose_factor": 4}, {}, r"lora.decompose_factor: a LoKr/LoHa option"),
        ({"type": "loha", "decompose_both": True}, {}, "lora.decompose_both: a LoKr option"),
        ({"type": "lokr", "dropout": 0.1}, {}, "LoKr has no input dropout"),
        ({"type": "lokr", "use_dora": True}, {}, "DoRA is a LoRA option"),
        ({"type": "loha"}, {"loraplus_lr_ratio": 16}, "LoRA's up-projection"),
        ({"type": "lokr", "use_effective_conv2d": True}, {}, "only changes 3x3 convolutions"),
        ({"type": "lokr", "decompose_factor": 1}, {}, "splits nothing"),
        ({"type": "lokrr"}, {}, "did you mean 'lokr'"),
    ],
)
def test_invalid_adapter_type_combinations_are_refused_in_one_line(
    tiny_base, tiny_dataset, tmp_path, lora, train, message
):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, lora=lora, train=train)
    with pytest.raises(LorakitError, match=message):
        recipe_from_dict(recipe)


def test_loraplus_puts_the_up_projections_in_their_own_group(tiny_base, tiny_dataset, tmp_path):
    recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path, train={"max_steps": 2, "loraplus_lr_ratio": 16})
    result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["lr_unet.up"] == pytest.approx(16 * row["lr_unet"])
    assert row["lr_text_encoder.up"] == pytest.approx(16 * row["lr_text_encoder"])


def test_loraplus_ratios_of_their_own_for_the_unet_and_the_text_encoder(tiny_base, tiny_dataset, tmp_path):
    """kohya's loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio: each part's own ratio, or none."""
    rows = {}
    for label, ratios in (
        ("both", {"loraplus_lr_ratio": 16, "loraplus_unet_lr_ratio": 4, "loraplus_text_encoder_lr_ratio": 2}),
        ("te", {"loraplus_text_encoder_lr_ratio": 8}),
    ):
        recipe = make_recipe_dict(tiny_base, tiny_dataset, tmp_path / label, train={"max_steps": 1, **ratios})
        result = train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
        rows[label] = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows["both"]["lr_unet.up"] == pytest.approx(4 * rows["both"]["lr_unet"])
    assert rows["both"]["lr_text_encoder.up"] == pytest.approx(2 * rows["both"]["lr_text_encoder"])
    assert rows["te"]["lr_text_encoder.up"] == pytest.approx(8 * rows["te"]["lr_text_encoder"])
    assert "lr_unet.up" not in rows["te"]


def test_a_half_precision_render_writes_the_update_into_the_weights_it_read(lycoris_run, tiny_base, tmp_path):
    """`generate --dtype bfloat16` reads a bfloat16 base in bfloat16; the LoKr/LoHa update goes in as W + update in
    float32, rounded once, which is what a float32 read cast afterwards held: the pixels are the same."""
    import numpy as np
    from PIL import Image

    from .conftest import watched_render_loads
    from .tiny import save_in_dtype

    result, _ = lycoris_run
    half = save_in_dtype(tiny_base, tmp_path / "half", torch.bfloat16)
    args = ["generate", "a photo", "--base", str(half), "--lora", str(result.adapter), "--dtype", "bfloat16"]
    args += ["--size", "64x64", "--steps", "2", "--quiet"]
    images = {}
    for name, dtype in (("read-in-it", None), ("cast-after", "float32")):
        with watched_render_loads(dtype):
            done = runner.invoke(app, [*args, "--out", str(tmp_path / name)])
        assert done.exit_code == 0, done.output
        with Image.open(next((tmp_path / name).glob("*.png"))) as image:
            images[name] = np.asarray(image)
    assert np.array_equal(images["read-in-it"], images["cast-after"])


def test_a_lokr_file_with_its_strengths_baked_in_stays_a_lokr_file(third_party, tmp_path):
    """`merge --lora FILE:0.5:lbw=...` on one LoKr file writes a LoKr file whose every update is the original's times
    its strength: the text encoder's and the kept blocks' at 0.5, the middle block (M00 at 0) left out."""
    from lorakit.formats.read import read_adapter_file

    path, _ = third_party
    vector = ",".join(["1"] * 13 + ["0"] + ["1"] * 12)  # BASE, IN00-IN11, M00 = 0, OUT00-OUT11
    out = tmp_path / "baked.safetensors"
    args = ["merge", "--lora", f"{path}:0.5:lbw={vector}", "--save-dtype", "float32", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    before, after = read_adapter_file(path).state, read_adapter_file(out).state
    kept = {(c, p) for c, modules in before.items() for p in modules if not p.startswith("mid_block.")}
    assert {(c, p) for c, modules in after.items() for p in modules} == kept and len(kept) < sum(
        map(len, before.values())
    )
    for component, name in kept:
        module = after[component][name]
        assert module.kind == "lokr"
        torch.testing.assert_close(module.delta(), 0.5 * before[component][name].delta(), rtol=1e-5, atol=1e-6)
