"""Pivotal tuning ([embedding]): the trigger word becomes new token vectors trained beside the LoRA; the file
written loads in diffusers, which then encodes prompts exactly as the trained text encoder did."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import OutputError, RecipeError
from lorakit.recipe import recipe_from_dict
from lorakit.train import train

from .conftest import make_recipe_dict
from .invoke import fails, ok, pixels
from .invoke import sd_pipeline as _pipe

SECTION = {"token": "ohwx", "vectors": 2, "init_words": "toy", "lr": 1e-2}


def _train(base, dataset, out, **sections):
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(base, dataset, out, **sections))
    return train(recipe, quiet=True, log=lines.append), lines


@pytest.fixture(scope="module")
def pivotal_run(tiny_base, tiny_dataset, tmp_path_factory):
    """A short SD 1.x run with the text encoder's LoRA and two new token vectors for "ohwx", frozen after half the
    steps, saving at step 2 too."""
    sections = {"embedding": {**SECTION, "train_until": 0.5}, "train": {"max_steps": 4, "save_every_steps": 2}}
    return _train(tiny_base, tiny_dataset, tmp_path_factory.mktemp("pivotal"), **sections)


def _in_memory_embeds(result, base, prompt: str, names: list[str]) -> torch.Tensor:
    """What the trained text encoder makes of `prompt`, with the word spelled as its new tokens as training does."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    tokenizer.add_tokens(names)
    ids = tokenizer(prompt.replace("ohwx", " ".join(names)), padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return result.models["text_encoder"].eval()(ids)[0]


def test_the_embedding_loads_in_diffusers_and_encodes_as_trained(pivotal_run, tiny_base):
    from lorakit.embedding import load_embedding

    result, lines = pivotal_run
    assert (
        "embedding: 'ohwx' is 2 new tokens (<ohwx0> <ohwx1>) in 8 of 8 captions, learning at 0.01 until step 2, "
        "then frozen" in lines
    )
    tensors = load_file(result.embedding)
    assert set(tensors) == {"emb_params"} and tensors["emb_params"].shape == (2, 32)
    from safetensors import safe_open

    with safe_open(str(result.adapter), "pt") as f:  # the adapter says which file goes with it
        assert f.metadata()["lorakit_embedding"] == "embeddings/ohwx.safetensors"
    assert result.embedding == result.run_dir / "embeddings" / "ohwx.safetensors"
    pipe = _pipe(tiny_base)
    started_from = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer("toy", add_special_tokens=False).input_ids[0]
    ]
    assert not torch.allclose(tensors["emb_params"][0], started_from)  # the vectors learned
    said = ok(["inspect", str(result.embedding)]).stdout  # inspect tells an embedding from an adapter
    for line in (
        "layout: textual-inversion embedding",
        "architecture: SD 1.x",
        "word: 'ohwx'",
        "2 vectors of width 32",
    ):
        assert line in said, said
    pipe.load_lora_weights(str(result.adapter))
    assert load_embedding(pipe, result.embedding) == "ohwx"
    prompt = "a photo of ohwx on a table"
    with torch.no_grad():
        got = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    want = _in_memory_embeds(result, tiny_base, prompt, ["<ohwx0>", "<ohwx1>"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    without = _pipe(tiny_base)
    without.load_lora_weights(str(result.adapter))
    with torch.no_grad():
        plain = without.encode_prompt(prompt, "cpu", 1, False)[0]
    assert (plain - want).abs().max() > 1e-2  # the word alone, without its vectors, means something else


def test_after_train_until_the_vectors_stay_and_the_lora_goes_on(pivotal_run):
    result, _ = pivotal_run
    at_step_2 = load_file(result.run_dir / "embeddings" / "ohwx-step00000002.safetensors")["emb_params"]
    assert torch.equal(at_step_2, load_file(result.embedding)["emb_params"])
    lora_2 = load_file(result.run_dir / "run-step00000002.safetensors")
    lora_4 = load_file(result.adapter)
    assert any(not torch.equal(lora_2[k], lora_4[k]) for k in lora_4 if k.startswith("lora_unet"))


def test_a_resumed_pivotal_run_equals_a_straight_one(tiny_base, tiny_dataset, tmp_path):
    import shutil

    sections = {"embedding": {**SECTION, "train_until": 0.75}, "train": {"max_steps": 4, "save_every_steps": 2}}
    straight, _ = _train(tiny_base, tiny_dataset, tmp_path / "a", **sections)
    resumed_dir = tmp_path / "b" / "run"
    shutil.copytree(straight.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-000004")
    lines: list[str] = []
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "b", **sections))
    resumed = train(recipe, resume="latest", quiet=True, log=lines.append)
    assert resumed.steps == 4
    assert torch.equal(load_file(straight.embedding)["emb_params"], load_file(resumed.embedding)["emb_params"])
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the vectors are part of the checkpoint: a resume without the [embedding] is refused
    del sections["embedding"]
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path / "b", **sections))
    with pytest.raises(OutputError, match=r"--resume: embedding\.(token|only) changed from .* to None"):
        train(recipe, resume="latest", quiet=True, log=lambda _: None)


def test_sdxl_gets_vectors_for_both_encoders_which_diffusers_loads(tiny_sdxl, tiny_dataset, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lorakit.embedding import load_embedding
    from lorakit.models import encode_prompts, load_base, tokenize

    result, _ = _train(tiny_sdxl, tiny_dataset, tmp_path, embedding=SECTION, train={"max_steps": 2})
    assert set(result.models) == {"unet"}  # the encoders stay frozen; only the word's vectors learn through them
    tensors = load_file(result.embedding)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    load_embedding(pipe, result.embedding)
    prompt = "a photo of ohwx"
    with torch.no_grad():
        got, _, pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    # lorakit's own encoding of the same prompt, with the trained vectors put in the frozen encoders
    from lorakit.embedding import add_new_tokens

    base = load_base(str(tiny_sdxl))
    for te, tok, key in zip(base.text_encoders, base.tokenizers, ("clip_l", "clip_g"), strict=True):
        module = add_new_tokens(te, tok, "ohwx", 2, "", torch.Generator().manual_seed(0))
        module.vectors.data.copy_(tensors[key])
    base.placeholders["ohwx"] = "<ohwx0> <ohwx1>"
    with torch.no_grad():
        want = encode_prompts(base, tokenize(base, [prompt]))
    torch.testing.assert_close(got, want["encoder_hidden_states"], rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, want["pooled"], rtol=0, atol=1e-5)


def test_generate_with_the_run_folder_loads_the_embedding(pivotal_run, tmp_path):
    result, _ = pivotal_run
    said = ok(
        [
            "generate",
            "a photo of ohwx",
            "--lora",
            str(result.run_dir),
            "--out",
            str(tmp_path / "g"),
            "--size",
            "64x64",
            "--steps",
            "2",
        ]
    ).output
    assert f"The run's embedding: {result.embedding}, the word 'ohwx'" in said
    assert len(list((tmp_path / "g").glob("*.png"))) >= 1


def _compare_saves(run, out, fast) -> list[str]:
    """`generate --compare-saves` on a run folder; the grid's column labels."""
    import json

    from PIL import Image

    ok(["generate", "a ohwx toy", "--lora", str(run), "--compare-saves", *fast, "--out", str(out)])
    with Image.open(out / "grid.png") as grid:
        return json.loads(grid.text["lorakit_grid"])["columns"]


def test_compare_saves_draws_each_save_with_its_own_embedding(tiny_base, tiny_dataset, tmp_path):
    """A pivotal run's saves: each column draws that save's adapter with that save's vectors, as the two files do
    when loaded on their own."""
    import numpy as np

    sections = {"embedding": SECTION, "train": {"max_steps": 4, "save_every_steps": 2}}
    run = _train(tiny_base, tiny_dataset, tmp_path / "run", **sections)[0].run_dir
    early = run / "embeddings" / "ohwx-step00000002.safetensors"
    assert not torch.equal(
        load_file(early)["emb_params"], load_file(run / "embeddings" / "ohwx.safetensors")["emb_params"]
    )
    fast = ["--steps", "2", "--size", "64x64", "--quiet"]
    assert _compare_saves(run, tmp_path / "saves", fast) == ["step 2", "final (step 4)"]
    alone = tmp_path / "alone"
    ok(
        [
            "generate",
            "a ohwx toy",
            "--base",
            str(tiny_base),
            "--lora",
            str(run / "run-step00000002.safetensors"),
            "--embedding",
            str(early),
            *fast,
            "--out",
            str(alone),
        ]
    )
    assert np.array_equal(pixels(tmp_path / "saves" / "000-seed0-step2.png"), pixels(alone / "000-seed0.png"))
    ok(["generate", "a ohwx toy", "--lora", str(run), *fast, "--out", str(tmp_path / "final")])
    assert np.array_equal(
        pixels(tmp_path / "saves" / "001-seed0-final.png"), pixels(tmp_path / "final" / "000-seed0.png")
    )


@pytest.mark.parametrize(
    ("embedding", "data", "fragment"),
    [
        ({"token": "sks"}, {}, "embedding.token: 'sks' is in none of the 8 captions"),
        ({"token": "ohwx man"}, {}, "embedding.token: 'ohwx man' is not one word"),
    ],
)
def test_an_embedding_that_cannot_learn_is_refused(tiny_base, tiny_dataset, tmp_path, embedding, data, fragment):
    with pytest.raises(RecipeError, match=fragment):
        _train(tiny_base, tiny_dataset, tmp_path, embedding=embedding, data=data)
    assert not (tmp_path / "run").exists()


def test_samples_and_the_plan_see_the_new_tokens(tiny_base, tiny_dataset, tmp_path, monkeypatch):
    import lorakit.train.images as images
    from lorakit.memory import estimate

    prompts: list[str] = []
    real = images.render
    monkeypatch.setattr(images, "render", lambda pipe, texts, *a: prompts.extend(texts) or real(pipe, texts, *a))
    sections = {
        "embedding": SECTION,
        "train": {"max_steps": 1},
        "sample": {"prompts": ["ohwx on a table --s 1"], "negative_prompt": "blurry ohwx"},
    }
    recipe = recipe_from_dict(make_recipe_dict(tiny_base, tiny_dataset, tmp_path, **sections))
    result = train(recipe, quiet=True, log=lambda _: None)
    assert prompts == ["<ohwx0> <ohwx1> on a table"]
    # lorakit plan counts the vectors (2 x the encoder's width, 32 here) among the trained parameters exactly
    planned = estimate(recipe, "sd15").trainable
    assert sum(planned) == result.trainable_parameters and planned[-1] == 2 * 32


def test_generate_reads_textual_inversion_files_as_the_webuis_name_them(pivotal_run, tiny_base, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    result, _ = pivotal_run

    def image(*args):
        out = tmp_path / f"g{len(list(tmp_path.glob('g*')))}"
        said = ok(["generate", "a photo of ohwx", "--out", str(out), "--size", "64x64", "--steps", "2", *args])
        with Image.open(next(out.glob("*.png"))) as drawn:
            return np.asarray(drawn), said.output

    # the run's pair by hand (the word from the file's metadata) draws what the run folder draws
    by_folder, _ = image("--lora", str(result.run_dir))
    by_hand, said = image(
        "--base", str(tiny_base), "--lora", str(result.adapter), "--embedding", str(result.embedding)
    )
    assert "Embedding" in said and "the word 'ohwx'" in said
    assert np.array_equal(by_folder, by_hand)
    # a webui file: one tensor under its own key, called by its file name (here in the negative prompt), or by
    # the word given after ':'
    vectors = load_file(result.embedding)["emb_params"]
    save_file({"*": vectors}, str(tmp_path / "mynegative.safetensors"))
    _, said = image(
        "--base", str(tiny_base), "--embedding", str(tmp_path / "mynegative.safetensors"), "--negative", "mynegative"
    )
    assert "the word 'mynegative'" in said
    _, said = image("--base", str(tiny_base), "--embedding", f"{tmp_path / 'mynegative.safetensors'}:other")
    assert "the word 'other'" in said
    # made for another architecture: one line naming the file, nothing drawn
    save_file({"clip_l": vectors, "clip_g": torch.zeros(2, 48)}, str(tmp_path / "xl.safetensors"))
    save_file({"emb_params": torch.zeros(2, 48)}, str(tmp_path / "wide.safetensors"))
    for name, fragment in (
        ("xl.safetensors", "an SDXL embedding (clip_l and clip_g) but the base is SD 1.x/2.x"),
        ("wide.safetensors", "its vectors are 48 wide but this base's text encoder takes 32"),
        ("none.safetensors", "embedding file not found"),
    ):
        args = ["generate", "a photo", "--base", str(tiny_base), "--out", str(tmp_path / "no"), "--size", "64x64"]
        fails([*args, "--embedding", str(tmp_path / name)], f"{tmp_path / name}: {fragment}")
    assert not list((tmp_path / "no").glob("*.png"))


def _only(base, dataset, out, **sections) -> dict:
    """The tests' recipe without the LoRA settings it gives, which `embedding.only` refuses."""
    recipe = make_recipe_dict(base, dataset, out, **sections)
    recipe.pop("lora", None)
    for key in ("unet_lr", "text_encoder_lr"):
        recipe["train"].pop(key, None)
    return recipe


def test_an_embedding_alone_trains_only_its_vectors(tiny_base, tiny_dataset, tmp_path):
    """Textual inversion (`embedding.only`): no LoRA, a frozen base, the vectors learn; the file is the result,
    diffusers loads it, `generate` takes the run folder, `plan` counts it, and a resume continues it exactly."""
    import shutil

    from diffusers import UNet2DConditionModel

    from lorakit.plan import plan

    sections = {"embedding": {**SECTION, "only": True}, "train": {"max_steps": 4, "save_every_steps": 2}}
    lines: list[str] = []
    result = train(
        recipe_from_dict(_only(tiny_base, tiny_dataset, tmp_path / "a", **sections)), quiet=True, log=lines.append
    )
    assert "embedding.only: no LoRA; only the new token vectors train (textual inversion)" in lines
    assert result.adapter == result.embedding == result.run_dir / "embeddings" / "ohwx.safetensors"
    assert not list(result.run_dir.glob("*.safetensors"))  # no adapter files
    assert (result.run_dir / "embeddings" / "ohwx-step00000002.safetensors").is_file()
    planned = plan(recipe_from_dict(_only(tiny_base, tiny_dataset, tmp_path / "p", **sections)), vram=8)
    assert result.trainable_parameters == 2 * 32 == sum(planned.memory.trainable)
    fresh = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    trained_unet = dict(result.models["unet"].named_parameters())
    assert all(torch.equal(p, trained_unet[n]) for n, p in fresh.named_parameters())  # the base is untouched
    vectors = load_file(result.embedding)["emb_params"]
    pipe = _pipe(tiny_base)
    start = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("toy", add_special_tokens=False).input_ids]
    assert not torch.allclose(vectors, start.expand_as(vectors), atol=1e-4)  # started at "toy", then learned
    pipe.load_textual_inversion(str(result.embedding), token="ohwx")
    with torch.no_grad():
        learned = pipe.encode_prompt("a ohwx toy", "cpu", 1, False)[0]
        plain = pipe.encode_prompt("a toy toy", "cpu", 1, False)[0]
    assert not torch.allclose(learned, plain, atol=1e-3)
    # generate with the run folder loads the embedding by itself, as with --embedding
    fast = ["--steps", "2", "--size", "64x64", "--seed", "1", "--quiet"]
    ok(["generate", "a ohwx toy", "--lora", str(result.run_dir), *fast, "--out", str(tmp_path / "g1")])

    def with_embedding(file, out):  # the base with one embedding file, nothing else
        ok(["generate", "a ohwx toy", "--base", str(tiny_base), "--embedding", str(file), *fast, "--out", str(out)])

    with_embedding(result.embedding, tmp_path / "g2")
    assert (tmp_path / "g1" / "000-seed1.png").read_bytes() == (tmp_path / "g2" / "000-seed1.png").read_bytes()
    # --compare-saves: a column per saved embedding, each drawing what that file draws on its own
    assert _compare_saves(result.run_dir, tmp_path / "saves", fast) == ["step 2", "final (step 4)"]
    with_embedding(result.run_dir / "embeddings" / "ohwx-step00000002.safetensors", tmp_path / "g3")
    saves = tmp_path / "saves"
    assert (pixels(saves / "000-seed1-step2.png") == pixels(tmp_path / "g3" / "000-seed1.png")).all()
    assert (pixels(saves / "001-seed1-final.png") == pixels(tmp_path / "g1" / "000-seed1.png")).all()
    assert not (pixels(saves / "000-seed1-step2.png") == pixels(saves / "001-seed1-final.png")).all()
    # a resume continues it exactly
    resumed_dir = tmp_path / "b" / "run"
    shutil.copytree(result.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-000004")
    recipe = recipe_from_dict(_only(tiny_base, tiny_dataset, tmp_path / "b", **sections))
    resumed = train(recipe, resume="latest", quiet=True, log=lambda _: None)
    assert torch.equal(load_file(resumed.embedding)["emb_params"], vectors)


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"lora": {"rank": 8}}, "lora.rank: embedding.only trains no LoRA; remove it"),
        ({"train": {"unet_lr": 1e-3}}, "train.unet_lr: a rate of the LoRA, which embedding.only does not train"),
        ({"embedding": {**SECTION, "only": True, "train_until": 0.5}}, "embedding.train_until: 0.5 would freeze"),
    ],
)
def test_an_embedding_alone_refuses_what_would_shape_a_lora(tiny_base, tiny_dataset, tmp_path, sections, fragment):
    recipe = _only(tiny_base, tiny_dataset, tmp_path, embedding={**SECTION, "only": True})
    for name, keys in sections.items():
        recipe.setdefault(name, {}).update(keys)
    with pytest.raises(RecipeError, match=fragment):
        recipe_from_dict(recipe)
