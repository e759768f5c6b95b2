"""The webui's prompt syntax in `generate` and in training samples: weights, BREAK and long prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.emphasis import prompt_embeddings
from lorakit.prompt_syntax import has_syntax, parse

from .invoke import ok, pixels


@pytest.mark.parametrize(
    ("prompt", "fragments", "syntax"),
    [
        ("a (red:1.5) ball", [("a ", 1.0), ("red", 1.5), (" ball", 1.0)], True),
        ("((red)) [[blue]]", [("red", 1.1 * 1.1), (" ", 1.0), ("blue", 1 / 1.1 / 1.1)], True),
        ("(red (hat:2)) cat", [("red ", 1.1), ("hat", 2.2), (" cat", 1.0)], True),
        ("a (red", [("a ", 1.0), ("red", 1.1)], True),  # left open: to the end
        ("a (red:1) hat", [("a red hat", 1.0)], True),  # weight 1, but the brackets are not words
        ("a) b]", [("a) b]", 1.0)], False),  # closing without opening: plain text
        (r"\(1990\) photo", [("(1990) photo", 1.0)], True),
        ("a red hat BREAK blue", [("a red hat", 1.0), ("", None), ("blue", 1.0)], True),
        ("time:1.5 (x:0.5)", [("time:1.5 ", 1.0), ("x", 0.5)], True),
        ("a red hat", [("a red hat", 1.0)], False),
        ("", [("", 1.0)], False),
    ],
)
def test_the_webui_syntax_becomes_weighted_fragments(prompt, fragments, syntax):
    got = parse(prompt)
    assert [t for t, _ in got] == [t for t, _ in fragments]
    assert [w for _, w in got] == pytest.approx([w for _, w in fragments])
    assert has_syntax(prompt) == syntax


def _pipe(base):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe(tiny_base):
    return _pipe(tiny_base)


def test_a_plain_prompt_encodes_as_the_pipeline_and_training_encode_it(sd_pipe, tiny_base):
    from lorakit.models import encode_prompts, load_base, tokenize

    ours = prompt_embeddings(sd_pipe, "a red hat", "blue")
    theirs = sd_pipe.encode_prompt("a red hat", "cpu", 1, True, "blue")
    torch.testing.assert_close(ours["prompt_embeds"], theirs[0])
    torch.testing.assert_close(ours["negative_prompt_embeds"], theirs[1])
    # clip skip: diffusers' own SD pipeline fails on it with transformers 5, so compare with what training encodes
    base = load_base(str(tiny_base))
    with torch.no_grad():
        trained = encode_prompts(base, tokenize(base, ["a red hat"]), clip_skip=2)["encoder_hidden_states"]
    torch.testing.assert_close(prompt_embeddings(sd_pipe, "a red hat", "", 2)["prompt_embeds"], trained)
    assert not torch.allclose(trained, ours["prompt_embeds"])


def test_sdxl_prompts_encode_as_its_pipeline_encodes_them(tiny_sdxl):
    pipe = _pipe(tiny_sdxl)
    for negative in ("blue", ""):  # no negative prompt is zeros on SDXL (force_zeros_for_empty_prompt)
        ours = prompt_embeddings(pipe, "a red hat", negative)
        theirs = pipe.encode_prompt("a red hat", device="cpu", negative_prompt=negative or None)
        for key, tensor in zip(
            ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
            theirs,
            strict=True,
        ):
            torch.testing.assert_close(ours[key], tensor, msg=key)
    weighted = prompt_embeddings(pipe, "a (red:1.4) hat", "")
    plain = prompt_embeddings(pipe, "a red hat", "")
    torch.testing.assert_close(weighted["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])  # unweighted
    assert not torch.allclose(weighted["prompt_embeds"], plain["prompt_embeds"])


def test_a_weight_scales_its_tokens_and_the_chunk_keeps_its_mean(sd_pipe, tiny_base):
    # CLIP's learned last layer norm leaves every token an offset; the tiny encoder's fresh one centres them (below)
    pipe = _pipe(tiny_base)
    norm = next(m for name, m in pipe.text_encoder.named_modules() if name.endswith("final_layer_norm"))
    torch.nn.init.constant_(norm.bias, 0.5)
    plain = prompt_embeddings(pipe, "a red hat", "")["prompt_embeds"]
    weighted = prompt_embeddings(pipe, "a (red:1.5) hat", "")["prompt_embeds"]
    weights = torch.ones(plain.shape[1])
    weights[2] = 1.5  # start token, "a", "red"
    scaled = plain * weights[None, :, None]
    torch.testing.assert_close(weighted, scaled * (plain.mean() / scaled.mean()))
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)
    same = prompt_embeddings(pipe, "a (red:1) hat", "")["prompt_embeds"]
    assert torch.equal(same, plain)
    # every token centred: the means are rounding noise, and their ratio would be anything up to inf; the weights
    # are applied without it
    centred = prompt_embeddings(sd_pipe, "a red hat", "")["prompt_embeds"]
    assert abs(centred.mean()) < 1e-6 * centred.abs().mean()
    weighted = prompt_embeddings(sd_pipe, "a (red:1.5) hat", "")["prompt_embeds"]
    torch.testing.assert_close(weighted, centred * weights[None, :, None])


def test_long_prompts_and_break_are_encoded_in_chunks(sd_pipe):
    words = "red hat " * 40  # 80 tokens: more than one context
    long = prompt_embeddings(sd_pipe, words + "blue", "")
    assert long["prompt_embeds"].shape[1] == 2 * 77 == long["negative_prompt_embeds"].shape[1]
    first = prompt_embeddings(sd_pipe, "red hat " * 37 + "red", "")["prompt_embeds"]  # its first 75 tokens
    torch.testing.assert_close(long["prompt_embeds"][:, :77], first)
    empty = prompt_embeddings(sd_pipe, "", "")["prompt_embeds"]
    torch.testing.assert_close(long["negative_prompt_embeds"][:, 77:], empty)  # padded with an empty chunk
    broken = prompt_embeddings(sd_pipe, "a red hat BREAK blue", "")["prompt_embeds"]
    assert broken.shape[1] == 2 * 77
    torch.testing.assert_close(broken[:, :77], prompt_embeddings(sd_pipe, "a red hat", "")["prompt_embeds"])
    torch.testing.assert_close(broken[:, 77:], prompt_embeddings(sd_pipe, "blue", "")["prompt_embeds"])


def test_a_full_chunk_ends_at_a_comma_near_its_end_as_in_the_webui(sd_pipe):
    from lorakit.emphasis import _chunks

    comma = sd_pipe.tokenizer.get_vocab()[",</w>"]
    near = "red " * 70 + ", " + "blue hat " * 5  # 70 words, a comma at 71, then 10 more: over one chunk
    first, second = _chunks(sd_pipe, sd_pipe.tokenizer, near)
    assert len(first[0]) == 71 and first[0][-1] == comma  # ended after the comma, 4 tokens short of 75
    assert len(second[0]) == 10 and comma not in second[0]  # the phrase after it starts the next chunk whole
    far = "red " * 40 + ", " + "blue hat " * 20  # the comma 34 tokens before the end: cut at 75 as usual
    first, second = _chunks(sd_pipe, sd_pipe.tokenizer, far)
    assert len(first[0]) == 75 and len(second[0]) == 81 - 75
    embeds = prompt_embeddings(sd_pipe, near, "")
    assert embeds["prompt_embeds"].shape[1] == 2 * 77


def test_a_textual_inversion_word_keeps_its_vectors_in_a_weighted_prompt(sd_pipe, tiny_base):
    pipe = _pipe(tiny_base)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    pipe.load_textual_inversion({"emb_params": vectors}, token="mystyle")
    ours = prompt_embeddings(pipe, "a (mystyle:1) hat", "")["prompt_embeds"]
    theirs = pipe.encode_prompt("a mystyle hat", "cpu", 1, False)[0]
    torch.testing.assert_close(ours, theirs)


def test_generate_draws_the_weights(tiny_base, tmp_path):
    fast = ["--base", str(tiny_base), "--seed", "3", "--steps", "2", "--size", "64x64", "--quiet"]
    for name, prompt in [("plain", "a red toy"), ("one", "a (red:1) toy"), ("strong", "a (red:1.8) toy")]:
        ok(["generate", prompt, *fast, "--out", str(tmp_path / name)])
    plain, one, strong = (pixels(tmp_path / n / "000-seed3.png") for n in ("plain", "one", "strong"))
    assert np.abs(one - plain).max() <= 1  # a weight of 1 is the plain prompt, encoded here
    assert np.abs(strong - plain).max() > 5
    # clip skip 2 renders (diffusers' pipeline alone fails on it with transformers 5) and draws something else
    ok(["generate", "a red toy", *fast, "--clip-skip", "2", "--out", str(tmp_path / "skip")])
    assert np.abs(pixels(tmp_path / "skip" / "000-seed3.png") - plain).max() > 5


def test_weighted_caption_tokens_are_the_plain_ones_with_their_weights(tiny_base, tiny_sdxl):
    from lorakit.models import load_base, tokenize, tokenize_weighted

    for folder in (tiny_base, tiny_sdxl):
        base = load_base(str(folder))
        ids, weights = tokenize_weighted(base, ["a (red:1.5) hat, [blue]", "a red hat"])
        assert all(
            torch.equal(a, b) for a, b in zip(ids, tokenize(base, ["a red hat, blue", "a red hat"]), strict=True)
        )
        # start, a, red, hat, ",", blue, end, padding
        assert weights[0, :8].tolist() == pytest.approx([1, 1, 1.5, 1, 1, 1 / 1.1, 1, 1])
        assert torch.equal(weights[1], torch.ones(weights.shape[1]))
    long_ids, long_weights = tokenize_weighted(base, ["(red:2) hat"], max_token_length=150)
    assert long_ids[0].shape == long_weights.shape == (1, 152)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_training_encodes_weighted_captions_as_kohya_does(
    tiny_base, tiny_dataset, tmp_path, conditioning_calls, train_text_encoder
):
    from lorakit.models import encode_prompts, load_base, tokenize_weighted
    from lorakit.recipe import recipe_from_dict
    from lorakit.train import train

    from .conftest import make_recipe_dict
    from .tiny import captioned_copy

    data = captioned_copy(tmp_path / "data", "(red:1.5) toy, [ball]", tiny_dataset)
    recipe = make_recipe_dict(
        tiny_base,
        data,
        tmp_path / "out",
        train={"max_steps": 1},
        lora={"train_text_encoder": train_text_encoder},
        data={"weighted_captions": True},
    )
    train(recipe_from_dict(recipe), quiet=True, log=lambda _: None)
    captions, conditioning = conditioning_calls[0].captions, conditioning_calls[0].conditioning
    assert set(captions) == {"ohwx, (red:1.5) toy, [ball]"}
    base = load_base(str(tiny_base))  # the adapters start at zero: the first step encodes with the base
    ids, weights = tokenize_weighted(base, captions)
    with torch.no_grad():
        plain = encode_prompts(base, ids)["encoder_hidden_states"]
    got = conditioning["encoder_hidden_states"].detach()
    torch.testing.assert_close(got, plain * weights[:, :, None], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_webui_lora_tags_in_sample_prompts_are_refused_in_one_line():
    """Training samples draw the adapter being trained; `generate` reads the tags (tests/test_generate.py)."""
    from lorakit.errors import RecipeError
    from lorakit.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match=r"sample.prompts\[1\]: the webui tag <lora:x:1> would be encoded"):
        recipe_from_dict({"model": {"base": "x/y"}, "sample": {"prompts": ["a toy", "a toy <lora:x:1>"]}})


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_weighted_prompts_stay_in_a_half_precision_pipelines_dtype(tiny_base, tiny_sdxl, family):
    """`generate` renders in float16 on CUDA; bfloat16 is the half precision a CPU runs. The embeddings of weighted,
    chunked and clip-skipped prompts come out in the pipeline's dtype (a float32 one would stop the U-Net), and
    equal the float32 pipeline's up to bfloat16's rounding."""
    pipe = _pipe(tiny_base if family == "sd" else tiny_sdxl)
    prompt, negative = "a (red:1.5) toy, BREAK [blue] sky", "(ugly:1.2)"
    full = prompt_embeddings(pipe, prompt, negative, clip_skip=2)
    half = prompt_embeddings(pipe.to(torch.bfloat16), prompt, negative, clip_skip=2)
    assert set(half) == set(full) and all(t.dtype == torch.bfloat16 for t in half.values())
    for key, tensor in half.items():
        torch.testing.assert_close(tensor.float(), full[key], atol=0.05, rtol=0.05)
