"""LoRA Block Weight (`lbw=`) and separate text-encoder / U-Net strengths: the webui extension's block layouts on the
real architectures, the strengths baked into the factors, `generate` and `merge` drawing and writing them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from lorakit.adapters import LoraModule, delta_weight, matching_modules, resolve_targets
from lorakit.architectures import build_on_meta
from lorakit.bake import path_and_scale
from lorakit.block_weight import LAYOUTS, Strengths, block_of, block_values, split_strengths, weighted_state
from lorakit.cli import app
from lorakit.errors import AdapterError
from lorakit.formats.files import write_adapter
from lorakit.formats.read import read_adapter_file
from lorakit.lycoris import LycorisModule
from lorakit.prompt_syntax import lora_tags, scale_lora_tags
from lorakit.render import parse_a1111_parameters

from .invoke import fails, generate, pixels

runner = CliRunner()
FAST = ["--size", "64x64", "--steps", "3", "--quiet"]

# On the tiny base (one layer per resolution, two resolutions) the trained adapter sits in IN01
# (down_blocks.0.attentions.0), M00 (mid_block) and OUT02 / OUT03 (up_blocks.1.attentions.0 / .1), and the text
# encoder. This 26-value vector keeps IN01 and the text encoder, halves OUT02 and turns M00 and OUT03 off.
VECTOR = ",".join(["1", "0", "1", *["0"] * 10, "0", "0", "0", "0.5", *["0"] * 9])


@pytest.mark.parametrize(("family", "short", "full"), [("sd15", 17, 26), ("sd21", 17, 26), ("sdxl", 12, 20)])
def test_the_short_vectors_name_exactly_the_blocks_that_hold_attention(family, short, full):
    """The extension's 17 (SDXL: 12) values are BASE and the blocks a LoRA on the transformer blocks reaches; a LoCon
    reaches blocks of the full layout only."""
    unet = build_on_meta(family, "unet")
    blocks = {
        preset: {block_of("unet", path, 2) for path in matching_modules(unet, resolve_targets(preset, "unet"))}
        for preset in ("transformer", "transformer+conv")
    }
    assert blocks["transformer"] == set(LAYOUTS[short][1:])
    assert blocks["transformer+conv"] <= set(LAYOUTS[full][1:]) and len(blocks["transformer+conv"]) > short
    assert block_of("text_encoder_2", "encoder.layers.0.mlp.fc1", 2) == "BASE"
    assert block_of("unet", "conv_in", 2) == "IN00" and block_of("unet", "time_embedding.linear_1", 2) is None


def test_presets_and_short_vectors_expand_as_the_extension_does():
    outall = block_values("OUTALL", "sd1")
    assert outall["BASE"] == 1 and all(outall[f"OUT{i:02d}"] == 1 for i in range(3, 12))
    assert all(outall[f"IN{i:02d}"] == 0 for i in range(12)) and outall["M00"] == 0
    assert block_values("OUTALL", "sdxl")["OUT03"] == 1 and block_values("OUTALL", "sdxl")["OUT02"] == 0  # by name
    twelve = block_values("0.5,1,1,1,1,1,0,0,0,0,0,2", "sdxl")
    assert twelve["BASE"] == 0.5 and twelve["IN04"] == 1 and twelve["OUT05"] == 2 and twelve["IN01"] == 0
    assert block_values("MINE", "sd1", {"MINE": VECTOR})["OUT02"] == 0.5
    assert block_values("outall", "sd1") == outall  # preset names in any case


@pytest.mark.parametrize(
    ("spec", "family", "fragment"),
    [
        ("OUTAL", "sd1", "lbw=OUTAL: not a preset or a list of block strengths; close names: OUTALL"),
        ("0,1,1,1,1,1,0,0,0,0,0,2", "sd1", "12 values; a SD 1.x adapter takes 17 or 26"),
        (",".join(["1"] * 17), "sdxl", "17 values; a SDXL adapter takes 12 or 20"),
        (",".join(["1"] * 16 + ["R"]), "sd1", "lbw=" + ",".join(["1"] * 16 + ["R"]) + ": R: give a number between"),
        (",".join(["1"] * 16 + ["1e9"]), "sd1", "1e9: give a number between -100 and 100"),
    ],
)
def test_a_block_vector_that_cannot_apply_is_named(spec, family, fragment):
    with pytest.raises(AdapterError) as caught:
        block_values(spec, family)
    assert fragment in str(caught.value)


def _lora(rank=2, shape=(8, 6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    down, up = torch.randn(rank, shape[1], generator=generator), torch.randn(shape[0], rank, generator=generator)
    return LoraModule(down=down, up=up, alpha=1.0)


def test_strengths_scale_each_module_update_by_its_block_and_leave_out_the_zeros():
    state = {
        "text_encoder": {"encoder.layers.0.self_attn.q_proj": _lora(seed=1)},
        "unet": {
            "down_blocks.1.attentions.1.proj_in": _lora(seed=2),  # IN05
            "mid_block.attentions.0.proj_in": _lora(seed=3),  # M00
            "up_blocks.3.attentions.2.proj_out": _lora(seed=4),  # OUT11
            "time_embedding.linear_1": _lora(seed=5),  # outside the blocks: strength 1 (the unet= one)
        },
    }
    weighted = weighted_state(state, Strengths(te=0.5, unet=2.0, blocks="MIDD"), "x.safetensors", "sd1")
    factors = {"encoder.layers.0.self_attn.q_proj": 0.5, "down_blocks.1.attentions.1.proj_in": 2.0}
    factors |= {"mid_block.attentions.0.proj_in": 2.0, "time_embedding.linear_1": 2.0}
    assert {p for modules in weighted.values() for p in modules} == set(factors)  # OUT11 is 0 in MIDD: left out
    for component, modules in weighted.items():
        for path, module in modules.items():
            original = state[component][path]
            torch.testing.assert_close(
                delta_weight(module, (8, 6)), factors[path] * delta_weight(original, (8, 6)), rtol=1e-6, atol=1e-6
            )
            assert module.rank == original.rank and module.alpha == original.alpha  # the file keeps its ranks
    assert weighted_state(state, Strengths(), "x", "sd1") is state


def test_lokr_and_loha_updates_scale_too_and_dora_is_refused():
    generator = torch.Generator().manual_seed(0)
    lokr = LycorisModule(
        "lokr",
        {"lokr_w1": torch.randn(2, 2, generator=generator), "lokr_w2": torch.randn(4, 3, generator=generator)},
        None,
        (8, 6),
    )
    loha = LycorisModule(
        "loha",
        {
            name: torch.randn(*shape, generator=generator)
            for name, shape in (
                ("hada_w1_a", (8, 2)),
                ("hada_w1_b", (2, 6)),
                ("hada_w2_a", (8, 2)),
                ("hada_w2_b", (2, 6)),
            )
        },
        2.0,
        (8, 6),
    )
    for module in (lokr, loha):
        state = {"unet": {"mid_block.attentions.0.proj_in": module}}
        scaled = weighted_state(state, Strengths(unet=-0.7), "x", "sd1")["unet"]["mid_block.attentions.0.proj_in"]
        torch.testing.assert_close(scaled.delta(), -0.7 * module.delta())
    dora = dataclasses.replace(_lora(), magnitude=torch.ones(8))
    with pytest.raises(AdapterError, match="d.safetensors: a DoRA module takes a strength of 0 or 1 per block"):
        weighted_state({"unet": {"mid_block.attentions.0.proj_in": dora}}, Strengths(unet=0.5), "d.safetensors", "sd1")
    with pytest.raises(AdapterError, match="x:lbw=NONE: every module of the adapter is at strength 0"):
        weighted_state({"unet": {"mid_block.attentions.0.proj_in": _lora()}}, Strengths(blocks="NONE"), "x", "sd1")


def test_the_option_and_the_tag_read_strengths_as_the_webuis_do():
    assert split_strengths("C:\\loras\\a.safetensors:0.8:lbw=OUTALL", path_and_scale, "--lora") == (
        "C:\\loras\\a.safetensors",
        0.8,
        Strengths(blocks="OUTALL"),
    )
    assert split_strengths("a.safetensors:0.8:unet=0", path_and_scale, "--lora") == (
        "a.safetensors",
        1.0,
        Strengths(te=0.8, unet=0.0),
    )
    with pytest.raises(ValueError, match="te=x: give a number"):
        split_strengths("a.safetensors:te=x", path_and_scale, "--lora")

    def read(tag):
        return lora_tags(f"a photo {tag}")[1][0]

    assert (read("<lora:a:0.8:0.5>").te, read("<lora:a:0.8:0.5>").unet) == (0.8, 0.5)
    assert (read("<lora:a:te=0.5>").te, read("<lora:a:te=0.5>").unet) == (0.5, 0.5)  # unet follows te, as in A1111
    assert read("<lora:a:1:OUTALL>").blocks == "OUTALL" and read("<lora:a:1:OUTALL>").unet == 1
    assert read("<lora:a:0.7:lbw=1,0,1>").blocks == "1,0,1" and read("<lora:a:0.7:lbw=1,0,1>").te == 0.7
    assert scale_lora_tags("x <lora:a:0.8:0.4:lbw=INS>", 0.5) == "x <lora:a:0.4:0.2:lbw=INS>"
    for tag, fragment in (
        ("<lora:a:1:stop=late>", "stop=late: give a whole number of denoising steps"),
        ("<lora:a:1:1:8>", "dynamic rank"),
        ("<lora:a:1:lbwe=ATTNON>", "element weights (lbwe=) are not read"),
        ("<lora:a:1:foo=1>", "foo= is not a tag option lorakit reads"),
    ):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            lora_tags(tag)


@pytest.fixture(scope="module")
def by_hand(trained_run, tmp_path_factory):
    """The trained adapter edited by module path, as `VECTOR` asks: the middle block and up_blocks.1.attentions.1
    left out, up_blocks.1.attentions.0 at half its update."""
    adapter = read_adapter_file(trained_run.adapter)
    state = {component: dict(modules) for component, modules in adapter.state.items()}
    unet = {}
    for path, module in state["unet"].items():
        if path.startswith(("mid_block.", "up_blocks.1.attentions.1.")):
            continue
        if path.startswith("up_blocks.1.attentions.0."):
            module = dataclasses.replace(module, up=module.up.float() * 0.5)
        unet[path] = module
    assert len(unet) < len(state["unet"]) and {p.split(".")[0] for p in unet} == {"down_blocks", "up_blocks"}
    state["unet"] = unet
    path = tmp_path_factory.mktemp("by-hand") / "by_hand.safetensors"
    return write_adapter(state, path, "kohya", "float32", {"ss_base_model_version": "sd_v1"})


def test_a_block_vector_draws_what_the_adapter_edited_by_hand_draws(trained_run, tiny_base, by_hand, tmp_path):
    base = ["--base", str(tiny_base), *FAST]
    generate("ohwx toy", "--lora", f"{trained_run.adapter}:0.8:lbw={VECTOR}", "--out", str(tmp_path / "lbw"), *base)
    generate("ohwx toy", "--lora", f"{by_hand}:0.8", "--out", str(tmp_path / "hand"), *base)
    generate("ohwx toy", "--lora", f"{trained_run.adapter}:0.8", "--out", str(tmp_path / "whole"), *base)
    lbw = pixels(tmp_path / "lbw" / "000-seed0.png")
    assert np.array_equal(lbw, pixels(tmp_path / "hand" / "000-seed0.png"))
    assert not np.array_equal(lbw, pixels(tmp_path / "whole" / "000-seed0.png"))
    with Image.open(tmp_path / "lbw" / "000-seed0.png") as image:
        prompt = parse_a1111_parameters(image.text["parameters"])["prompt"]
    assert prompt.endswith(f"<lora:{trained_run.adapter.name.split('.')[0]}:0.8:lbw={VECTOR}>")


def test_tags_with_their_own_blocks_and_parts_draw_as_the_option_does(trained_run, tiny_base, tmp_path):
    """One adapter tagged three ways in three prompts of one call: each prompt draws what `--lora` with the same
    strengths draws alone."""
    import shutil

    (tmp_path / "Lora").mkdir()
    shutil.copy(trained_run.adapter, tmp_path / "Lora" / "mychar.safetensors")
    presets = tmp_path / "lbwpresets.txt"
    presets.write_text(f"# mine\nHAND:{VECTOR}\n")
    base = ["--base", str(tiny_base), *FAST]
    prompts = ["ohwx toy <lora:mychar:0.8:lbw=HAND>", "ohwx toy <lora:mychar:0.8:0>", "ohwx toy <lora:mychar:0.8>"]
    generate(
        *prompts,
        "--lora-dir",
        str(tmp_path / "Lora"),
        "--lbw-presets",
        str(presets),
        "--out",
        str(tmp_path / "t"),
        *base,
    )
    for index, extra in enumerate((f":0.8:lbw={VECTOR}", ":te=0.8:unet=0", ":0.8")):
        generate("ohwx toy", "--lora", f"{trained_run.adapter}{extra}", "--out", str(tmp_path / f"o{index}"), *base)
        tagged = pixels(tmp_path / "t" / f"{index:03d}-seed0.png")
        assert np.array_equal(tagged, pixels(tmp_path / f"o{index}" / "000-seed0.png")), extra
    assert not np.array_equal(pixels(tmp_path / "o0" / "000-seed0.png"), pixels(tmp_path / "o1" / "000-seed0.png"))


def test_merge_bakes_the_strengths_into_an_adapter_that_draws_them_at_strength_1(trained_run, tiny_base, tmp_path):
    baked = tmp_path / "baked.safetensors"
    args = ["merge", "--lora", f"{trained_run.adapter}:lbw={VECTOR}", "--save-dtype", "float32", "--out", str(baked)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "with its strengths baked in" in result.output, result.output
    base = ["--base", str(tiny_base), *FAST]
    generate("ohwx toy", "--lora", str(baked), "--out", str(tmp_path / "baked"), *base)
    generate("ohwx toy", "--lora", f"{trained_run.adapter}:lbw={VECTOR}", "--out", str(tmp_path / "lbw"), *base)
    assert np.array_equal(pixels(tmp_path / "baked" / "000-seed0.png"), pixels(tmp_path / "lbw" / "000-seed0.png"))
    original, written = read_adapter_file(trained_run.adapter), read_adapter_file(baked)
    assert len(written.state["unet"]) < len(original.state["unet"])
    assert {m.rank for m in written.state["unet"].values()} == {m.rank for m in original.state["unet"].values()}
    with safe_open(str(trained_run.adapter), "pt") as a, safe_open(str(baked), "pt") as b:
        assert b.metadata()["ss_network_dim"] == a.metadata()["ss_network_dim"]
        assert b.metadata()["ss_training_started_at"] == a.metadata()["ss_training_started_at"]
        assert b.metadata()["sshs_model_hash"] != a.metadata()["sshs_model_hash"]  # its own tensors' hash
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "up to date" in again.output


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (":lbw=OUTAL", "lbw=OUTAL: not a preset or a list of block strengths; close names: OUTALL"),
        (":lbw=1,1,1,1,1,1,1,1,1,1,1,1", "12 values; a SD 1.x adapter takes 17 or 26"),
        (":te=loud", "te=loud: give a number between -100 and 100"),
        (":lbw=NONE:te=0", "every module of the adapter is at strength 0"),
    ],
)
def test_strengths_that_cannot_apply_are_named_before_anything_is_written(
    trained_run, tiny_base, tmp_path, extra, fragment
):
    fails(["merge", "--lora", f"{trained_run.adapter}{extra}", "--out", str(tmp_path / "m.safetensors")], fragment)
    assert not (tmp_path / "m.safetensors").exists()
    args = ["generate", "a toy", "--base", str(tiny_base), "--lora", f"{trained_run.adapter}{extra}"]
    fails([*args, "--out", str(tmp_path / "g"), *FAST], fragment)


def test_merge_into_a_base_applies_the_parts_it_is_given(trained_run, tiny_base, tmp_path):
    """te=0 leaves the base's text encoder as it was; the U-Net gets the adapter's update."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged"
    args = ["merge", "--lora", f"{trained_run.adapter}:te=0:unet=1", "--base", str(tiny_base), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    base, merged = (
        StableDiffusionPipeline.from_pretrained(str(p), safety_checker=None, requires_safety_checker=False)
        for p in (tiny_base, out)
    )
    for name, tensor in base.text_encoder.state_dict().items():
        assert torch.equal(tensor, merged.text_encoder.state_dict()[name]), name
    assert any(not torch.equal(t, merged.unet.state_dict()[n]) for n, t in base.unet.state_dict().items())


def test_an_sdxl_vector_keeps_the_blocks_it_names_and_both_text_encoders(sdxl_run, tiny_sdxl, tmp_path):
    """12 values on SDXL: BASE and the input blocks on, the middle and output blocks off; what is kept is exactly the
    down_blocks modules and both text encoders', and `generate` draws it."""
    result, _ = sdxl_run
    adapter = read_adapter_file(result.adapter)
    assert adapter.family == "sdxl"
    weighted = weighted_state(adapter.state, Strengths(blocks="1,1,1,1,1,0,0,0,0,0,0,0"), "x", "sdxl")
    assert {p.split(".")[0] for p in weighted["unet"]} == {"down_blocks"}
    assert set(weighted) == {"unet", "text_encoder", "text_encoder_2"}
    assert len(weighted["text_encoder_2"]) == len(adapter.state["text_encoder_2"])
    args = ["a toy", "--base", str(tiny_sdxl), *FAST]
    generate(*args, "--lora", f"{result.adapter}:lbw=1,1,1,1,1,0,0,0,0,0,0,0", "--out", str(tmp_path / "lbw"))
    generate(*args, "--lora", str(result.adapter), "--out", str(tmp_path / "whole"))
    assert not np.array_equal(pixels(tmp_path / "lbw" / "000-seed0.png"), pixels(tmp_path / "whole" / "000-seed0.png"))


def test_inspect_shows_the_update_norm_of_each_block_and_a_baked_file_shows_its_vector(trained_run, tmp_path):
    """The blocks `inspect` names are the ones lbw= weights: the baked file keeps IN01 and BASE, halves OUT02, and
    drops M00 and OUT03."""
    import json

    def blocks(path):
        shown = runner.invoke(app, ["inspect", str(path), "--json"])
        assert shown.exit_code == 0, shown.output
        info = json.loads(shown.stdout)
        total = sum(entry["update_norm_total"] ** 2 for entry in info["components"].values()) ** 0.5
        assert sum(n * n for n in info["update_norm_by_block"].values()) ** 0.5 == pytest.approx(total)
        return info["update_norm_by_block"]

    before = blocks(trained_run.adapter)
    assert list(before) == ["BASE", "IN01", "M00", "OUT02", "OUT03"]
    baked = tmp_path / "baked.safetensors"
    args = ["merge", "--lora", f"{trained_run.adapter}:lbw={VECTOR}", "--save-dtype", "float32", "--out", str(baked)]
    assert runner.invoke(app, args).exit_code == 0
    after = blocks(baked)
    assert list(after) == ["BASE", "IN01", "OUT02"]
    assert after["BASE"] == pytest.approx(before["BASE"]) and after["IN01"] == pytest.approx(before["IN01"])
    assert after["OUT02"] == pytest.approx(0.5 * before["OUT02"])
    assert "update norm by block (lbw= names): BASE " in runner.invoke(app, ["inspect", str(baked)]).stdout


def test_compare_lbw_draws_a_column_per_vector_each_as_that_vector_alone(trained_run, tiny_base, by_hand, tmp_path):
    base = ["--base", str(tiny_base), *FAST]
    lora = ["--lora", f"{trained_run.adapter}:0.8"]
    every = ",".join(["1"] * 26)  # (the preset ALL is the 17 blocks of SD 1.x: it leaves the tiny U-Net's OUT02 out)
    generate("ohwx toy", *lora, "--compare-lbw", every, "--compare-lbw", VECTOR, "--out", str(tmp_path / "g"), *base)
    generate("ohwx toy", *lora, "--out", str(tmp_path / "whole"), *base)
    generate("ohwx toy", "--lora", f"{by_hand}:0.8", "--out", str(tmp_path / "hand"), *base)
    grid = tmp_path / "g"
    assert np.array_equal(pixels(grid / "000-seed0-lbw1.png"), pixels(tmp_path / "whole" / "000-seed0.png"))
    assert np.array_equal(pixels(grid / "001-seed0-lbw2.png"), pixels(tmp_path / "hand" / "000-seed0.png"))
    with Image.open(grid / "grid.png") as image:
        assert json.loads(image.text["lorakit_grid"])["columns"] == ["lbw vector 1", "lbw vector 2"]
    with Image.open(grid / "001-seed0-lbw2.png") as image:
        assert parse_a1111_parameters(image.text["parameters"])["prompt"].endswith(f":0.8:lbw={VECTOR}>")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--compare-lbw", "OUTAL"], "lbw=OUTAL: not a preset or a list of block strengths; close names: OUTALL"),
        (["--compare-lbw", "ALL", "--compare-scales", "0,1"], "--compare-scales and --compare-lbw: each sets"),
        (["--compare-lbw", "ALL", "--lora", "{adapter}"], "--compare-lbw: weights the blocks of one --lora adapter"),
    ],
)
def test_a_block_comparison_that_cannot_be_drawn_is_named(trained_run, tiny_base, tmp_path, extra, fragment):
    extra = [e.replace("{adapter}", str(trained_run.adapter)) for e in extra]
    args = ["generate", "a toy", "--base", str(tiny_base), "--lora", str(trained_run.adapter), *extra]
    fails([*args, "--out", str(tmp_path / "g"), *FAST], fragment)
    assert not (tmp_path / "g").exists()


def test_strengths_a_dora_file_cannot_take_are_named_before_the_base_is_loaded(trained_run, tmp_path, monkeypatch):
    adapter = read_adapter_file(trained_run.adapter)
    state = {
        component: {p: dataclasses.replace(m, magnitude=torch.ones(m.up.shape[0])) for p, m in modules.items()}
        for component, modules in adapter.state.items()
    }
    dora = write_adapter(state, tmp_path / "dora.safetensors", "diffusers", "float32", {})
    monkeypatch.setattr("lorakit.generate.load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    args = ["generate", "a toy", "--base", str(tmp_path), "--out", str(tmp_path / "g"), *FAST]
    fails([*args, "--lora", f"{dora}:lbw={VECTOR}"], "dora.safetensors: a DoRA module takes a strength of 0 or 1")
    fails([*args, "--lora", str(dora), "--compare-lbw", "ALL0.5"], "per block and part (its magnitudes renormalise")
    fails([*args, "--lora", f"{trained_run.adapter}:te=0:unet=0"], "every module of the adapter is at strength 0")


def test_an_adapter_split_into_its_blocks_and_merged_back_draws_as_the_whole(trained_run, tiny_base, tmp_path):
    """A block merge (SuperMerger's kind): the input blocks and text encoder of one copy, the middle and output blocks
    of another, merged exactly, give back the adapter, pixel for pixel."""
    ins = ",".join(["1", *["1"] * 12, "0", *["0"] * 12])  # BASE, IN00-IN11 on; M00, OUT00-OUT11 off
    rest = ",".join(["0", *["0"] * 12, "1", *["1"] * 12])
    merged = tmp_path / "merged.safetensors"
    args = ["merge", "--lora", f"{trained_run.adapter}:lbw={ins}", "--lora", f"{trained_run.adapter}:lbw={rest}"]
    result = runner.invoke(app, [*args, "--save-dtype", "float32", "--out", str(merged)])
    assert result.exit_code == 0, result.output
    written, original = read_adapter_file(merged).state, read_adapter_file(trained_run.adapter).state
    assert {c: set(m) for c, m in written.items()} == {c: set(m) for c, m in original.items()}
    base = ["--base", str(tiny_base), *FAST]
    generate("ohwx toy", "--lora", str(merged), "--out", str(tmp_path / "merged"), *base)
    generate("ohwx toy", "--lora", str(trained_run.adapter), "--out", str(tmp_path / "whole"), *base)
    assert np.array_equal(pixels(tmp_path / "merged" / "000-seed0.png"), pixels(tmp_path / "whole" / "000-seed0.png"))


def test_a_presets_file_that_cannot_be_read_is_named(trained_run, tmp_path):
    bad = tmp_path / "lbwpresets.txt"
    bad.write_text("# mine\nGOOD:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1\nHALF:1,0.5\n")
    args = ["merge", "--lora", f"{trained_run.adapter}:lbw=GOOD", "--out", str(tmp_path / "m.safetensors")]
    fails([*args, "--lbw-presets", str(bad)], "lbwpresets.txt, line 3: 'HALF:1,0.5' is not NAME:v,v,... with 12, 17")
    fails([*args, "--lbw-presets", str(tmp_path / "none.txt")], "none.txt: cannot be read (FileNotFoundError)")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_step_range_switches_the_unet_part_between_steps(trained_run, tiny_base, tmp_path):
    """The webuis' start= / stop=: the U-Net part is on over those denoising steps alone, the text encoder's as
    always. stop=0 (and a start past the last step) draws the text encoder's part alone; stop at the last step
    draws the whole adapter; stop=1 lies between; a tag and the option with the same range draw the same."""
    import shutil

    (tmp_path / "Lora").mkdir()
    shutil.copy(trained_run.adapter, tmp_path / "Lora" / "mychar.safetensors")
    base = ["--base", str(tiny_base), *FAST]  # 3 steps
    prompts = [f"ohwx toy <lora:mychar:0.8:{r}>" for r in ("stop=0", "start=3", "stop=3", "stop=1", "step=1-2")]
    generate(*prompts, "--lora-dir", str(tmp_path / "Lora"), "--out", str(tmp_path / "t"), *base)
    drawn = [pixels(tmp_path / "t" / f"{i:03d}-seed0.png") for i in range(len(prompts))]
    text_encoder_alone = ",".join(["1"] + ["0"] * 25)  # BASE only: the text encoder at the same 0.8 as the tags'
    for label, extra in (("te", f":0.8:lbw={text_encoder_alone}"), ("whole", ":0.8"), ("one", ":0.8:stop=1")):
        generate("ohwx toy", "--lora", f"{trained_run.adapter}{extra}", "--out", str(tmp_path / label), *base)
    te_only, whole, one = (pixels(tmp_path / label / "000-seed0.png") for label in ("te", "whole", "one"))
    assert np.array_equal(drawn[0], te_only) and np.array_equal(drawn[1], te_only)
    assert np.array_equal(drawn[2], whole)
    assert np.array_equal(drawn[3], one) and not np.array_equal(one, whole) and not np.array_equal(one, te_only)
    assert not any(np.array_equal(drawn[4], other) for other in (whole, te_only, one))
    with Image.open(tmp_path / "one" / "000-seed0.png") as image:
        assert parse_a1111_parameters(image.text["parameters"])["prompt"].endswith(":0.8:stop=1>")


def test_step_ranges_that_cannot_apply_are_named(trained_run, tiny_base, tmp_path):
    args = ["generate", "a toy", "--base", str(tiny_base), "--out", str(tmp_path / "g"), *FAST]
    fails([*args, "--lora", f"{trained_run.adapter}:start=2:stop=2"], "stop=2 is not after start=2")
    fails([*args, "--lora", f"{trained_run.adapter}:stop=soon"], "stop=soon: give a whole number of denoising steps")
    merge = ["merge", "--lora", f"{trained_run.adapter}:stop=10", "--out", str(tmp_path / "m.safetensors")]
    fails(merge, "start= / stop= apply while drawing")
    with pytest.raises(ValueError, match="step=A-B gives both ends"):
        lora_tags("<lora:a:1:step=1-4:stop=3>")


def test_a_step_range_on_sdxl(sdxl_run, tiny_sdxl, tmp_path):
    """SDXL's pipeline takes the same step callback: stop=0 draws the text encoders' parts alone."""
    result, _ = sdxl_run
    base = ["a toy", "--base", str(tiny_sdxl), *FAST]
    encoders_alone = ",".join(["1"] + ["0"] * 11)  # BASE only, of SDXL's 12 values
    generate(*base, "--lora", f"{result.adapter}:stop=0", "--out", str(tmp_path / "stopped"))
    generate(*base, "--lora", f"{result.adapter}:lbw={encoders_alone}", "--out", str(tmp_path / "encoders"))
    generate(*base, "--lora", str(result.adapter), "--out", str(tmp_path / "whole"))
    stopped = pixels(tmp_path / "stopped" / "000-seed0.png")
    assert np.array_equal(stopped, pixels(tmp_path / "encoders" / "000-seed0.png"))
    assert not np.array_equal(stopped, pixels(tmp_path / "whole" / "000-seed0.png"))
