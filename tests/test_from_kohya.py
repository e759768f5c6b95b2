"""`lorakit from-kohya`: a kohya sd-scripts config becomes a recipe that trains, with every setting accounted for."""

from __future__ import annotations

from lorakit.recipe import load_recipe

from .invoke import fails, ok

CONFIG = """
[model_arguments]
pretrained_model_name_or_path = "{base}"
v2 = false

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 8
network_alpha = 4
network_args = ["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1", "dylora_unit=4"]
unet_lr = 1.0
network_train_unet_only = false

[optimizer_arguments]
optimizer_type = "Prodigy"
optimizer_args = [
  "d_coef=2", "use_bias_correction=True", "safeguard_warmup=True", "decouple=True", "weight_decay=0.01"
]
learning_rate = 0.5
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 0.1

[dataset_arguments]
train_data_dir = "/data/img"
resolution = "768,768"
shuffle_caption = true
keep_tokens = 1
cache_latents = true
cache_latents_to_disk = true
caption_extension = ".txt"
dataset_config = ""

[training_arguments]
output_dir = "{out}"
output_name = "mychar"
save_precision = "fp16"
save_every_n_epochs = 1
max_train_epochs = 10
train_batch_size = 2
xformers = true
max_data_loader_n_workers = 0
seed = 42
mixed_precision = "bf16"
gradient_checkpointing = true
min_snr_gamma = 5
noise_offset = 0.05
sample_prompts = "prompts.txt"
sample_sampler = "euler_a"
sample_every_n_epochs = 1
full_bf16 = true
training_comment = "kohya run 12"
"""


def _config(tmp_path, base, **replace) -> object:
    text = CONFIG.format(base=base, out=tmp_path / "out")
    for old, new in replace.items():
        text = text.replace(old, new)
    (tmp_path / "prompts.txt").write_text(
        "# the usual two\nohwx man at the beach --n blurry --s 2\n\nohwx man portrait --s 2\n"
    )
    path = tmp_path / "kohya.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_kohya_config_becomes_a_recipe_that_trains(tiny_base, tiny_dataset, tmp_path):
    config = _config(tmp_path, tiny_base)
    recipe_path = tmp_path / "recipe.toml"
    said = ok(["from-kohya", str(config), "--out", str(recipe_path)]).stdout
    recipe = load_recipe(recipe_path)
    assert (recipe.lora.rank, recipe.lora.lora_alpha, recipe.lora.target_modules) == (8, 4.0, "transformer+conv")
    assert (recipe.lora.conv_rank, recipe.lora.conv_alpha, recipe.lora.rank_dropout) == (4, 2.0, 0.1)
    train = recipe.train
    assert (train.optimizer, train.prodigy_d_coef, train.prodigy_use_bias_correction) == ("prodigy", 2.0, True)
    assert train.prodigy_safeguard_warmup and train.weight_decay == 0.01
    assert (train.unet_lr, train.text_encoder_lr) == (1.0, 0.5)  # learning_rate is the default of the unset one
    assert (train.lr_scheduler, train.lr_scheduler_num_cycles) == ("cosine_with_restarts", 3)
    assert (train.max_epochs, train.save_every_epochs, train.batch_size) == (10, 1, 2)
    assert (train.mixed_precision, train.gradient_checkpointing, train.min_snr_gamma) == ("bf16", True, 5.0)
    assert (recipe.data.resolution, recipe.data.shuffle_tags, recipe.data.keep_tokens) == (768, True, 1)
    assert recipe.sample.prompts == ["ohwx man at the beach --n blurry --s 2", "ohwx man portrait --s 2"]
    assert (recipe.sample.sampler, recipe.sample.every_epochs) == ("euler_a", 1)
    assert (recipe.output.name, recipe.output.save_dtype, recipe.output.comment) == (
        "mychar",
        "float16",
        "kohya run 12",
    )
    # each key names where it came from
    written = recipe_path.read_text()
    assert "rank = 8  # network_dim" in written and 'optimizer = "prodigy"  # optimizer_type' in written
    # every setting is accounted for
    # 39 settings with a value (an empty one means kohya's default): 33 mapped, 5 not needed, 1 not carried over
    assert f"Wrote {recipe_path}: 33 of the 39 kohya settings mapped to recipe keys" in said
    assert "not needed in lorakit (5): v2, train_data_dir, cache_latents_to_disk, xformers" in said
    assert "not carried over (2):" in said  # the setting, and one of network_args
    assert "lr_warmup_steps: 0.1 is a share of max_train_steps" in said
    assert train.full_bf16 and "full_bf16 = true  # full_bf16" in written
    assert "network_args dylora_unit=4: lorakit has no equivalent" in said
    assert "dataset_config" not in said  # empty: kohya's default, nothing to carry over
    line = "lorakit prepare /data/img --out dataset --resolution 768 --caption-ext .txt --caption-lines first "
    line += "--kohya-folders"
    assert f"Prepare the photos first: {line}" in said  # caption_extension goes into the prepare line
    # and it trains (on the tiny model and dataset, one short epoch)
    settings = [f"data.folder={tiny_dataset}", "data.resolution=64", "train.max_epochs=1"]
    args = ["train", str(recipe_path), "--quiet", *[a for s in settings for a in ("--set", s)]]
    # Prodigy refuses two learning rates (its own check is a traceback at the first step): said before anything runs
    fails(args, "train.optimizer: Prodigy finds one step size for every parameter and refuses parameter groups with")
    assert not (tmp_path / "out" / "mychar").exists()
    ok([*args, "--set", "train.text_encoder_lr=1.0"])
    assert (tmp_path / "out" / "mychar" / "mychar.safetensors").is_file()


def test_values_and_files_it_cannot_read_are_refused_in_one_line(tiny_base, tmp_path):
    fails(["from-kohya", str(tmp_path / "none.toml")], "none.toml: not found")
    (tmp_path / "bad.toml").write_text("network_dim = [", encoding="utf-8")
    fails(["from-kohya", str(tmp_path / "bad.toml")], "bad.toml: not valid TOML")
    (tmp_path / "gui.json").write_text('{"LoRA_type": "Standard", "network_dim": 8}', encoding="utf-8")
    fails(["from-kohya", str(tmp_path / "gui.json")], "gui.json: a kohya_ss GUI settings file (JSON)")
    (tmp_path / "nobase.toml").write_text("network_dim = 8\n", encoding="utf-8")
    fails(
        ["from-kohya", str(tmp_path / "nobase.toml"), "--out", str(tmp_path / "r1.toml")],
        "no pretrained_model_name_or_path",
    )
    config = _config(tmp_path, tiny_base, **{"network_dim = 8": 'network_dim = "eight"'})
    fails(["from-kohya", str(config), "--out", str(tmp_path / "r2.toml")], "network_dim = 'eight': not a value")
    config = _config(tmp_path, tiny_base, **{'"conv_dim=4"': '"conv_dim=four"'})
    fails(
        ["from-kohya", str(config), "--out", str(tmp_path / "r4.toml")], "network_args conv_dim = 'four': not a value"
    )
    config = _config(tmp_path, tiny_base, **{'"networks.lora"': '"networks.dylora"'})
    said = ok(["from-kohya", str(config), "--out", str(tmp_path / "dylora.toml")]).stdout
    assert "network_module: 'networks.dylora' (lorakit trains" in said and "network_args: the arguments of" in said
    assert "network_module" not in said.split("not needed in lorakit")[1].split("\n")[0]
    config = _config(tmp_path, tiny_base, **{"network_dim = 8": "network_dim = 0"})
    fails(
        ["from-kohya", str(config), "--out", str(tmp_path / "r3.toml")],
        "lora.rank: 0 is outside 1..4096 (from network_dim)",
    )
    assert not any((tmp_path / f"r{i}.toml").exists() for i in (1, 2, 3, 4))
    config = _config(tmp_path, tiny_base)
    (tmp_path / "taken.toml").write_text("x", encoding="utf-8")
    fails(["from-kohya", str(config), "--out", str(tmp_path / "taken.toml")], "exists; pass --overwrite")


def test_every_training_option_the_readme_maps_is_read_by_from_kohya():
    import re
    from pathlib import Path

    from lorakit.kohya_config import DIRECT, NOT_NEEDED, SPECIAL

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("<!-- kohya-map:start -->") : readme.index("<!-- kohya-map:end -->")]
    names = set()
    for row in table.splitlines()[3:]:
        kohya = row.split("|")[1]
        if ".py" not in kohya:  # the resize / extract / merge scripts' options are not training settings
            names |= {n for n in re.findall(r"--([a-z_0-9]+)", kohya) if len(n) > 1}  # not the prompt options
    names -= {"resume"}  # `lorakit train --resume`, not a recipe key
    assert len(names) > 50
    assert names <= set(DIRECT) | set(SPECIAL) | set(NOT_NEEDED), sorted(names - set(DIRECT) - set(SPECIAL))


TRAINING = """
pretrained_model_name_or_path = "{base}"
network_dim = 4
network_alpha = 4
max_train_steps = 2
output_dir = "{out}"
output_name = "two"
prior_loss_weight = 0.5
train_data_dir = "/not/read"
caption_extension = ".txt"
shuffle_caption = true
"""

DATASET = """
[general]
keep_tokens = 1
enable_bucket = true

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "photos/close"
  class_tokens = "ohwx   man"
  num_repeats = 10
  color_aug = true

  [[datasets.subsets]]
  image_dir = "photos/far"
  class_tokens = "ohwx man"
  num_repeats = 3
  flip_aug = true
  color_aug = true

  [[datasets.subsets]]
  image_dir = "photos/men"
  class_tokens = "man"
  is_reg = true
  num_repeats = 1
"""


def test_a_kohya_dataset_config_becomes_prepare_lines_folders_and_a_prior(tiny_base, tmp_path, monkeypatch):
    import json
    import shlex

    from .messy import textured

    monkeypatch.chdir(tmp_path)  # the paths of a dataset config are read from where sd-scripts runs, as here
    for folder, seeds in (("close", (0, 1, 2)), ("far", (3, 4)), ("men", (5, 6))):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        for seed in seeds:
            textured(96, 96, seed).save(tmp_path / "photos" / folder / f"p{seed}.png")
    (tmp_path / "photos" / "close" / "p0.txt").write_text("ohwx man, red shirt")
    (tmp_path / "kohya.toml").write_text(TRAINING.format(base=tiny_base, out=tmp_path / "out"))
    (tmp_path / "dataset.toml").write_text(DATASET)
    said = ok(["from-kohya", "kohya.toml", "--dataset-config", "dataset.toml", "--out", "recipe.toml"]).stdout
    recipe = load_recipe(tmp_path / "recipe.toml")
    assert (recipe.data.folder, recipe.data.num_repeats) == (["dataset-1", "dataset-2"], [10, 3])
    assert (recipe.data.resolution, recipe.train.batch_size, recipe.data.keep_tokens) == (64, 2, 1)
    assert recipe.data.shuffle_tags  # from the training config: a subset falls back to it, as in sd-scripts
    assert not recipe.data.flip  # one subset flips, the other not: lorakit flips all or none, and says so
    prior = recipe.prior
    assert (prior.class_dir, prior.class_prompt, prior.num_class_images, prior.prior_loss_weight) == (
        "photos/men",
        "man",
        2,
        0.5,
    )
    lines = [line.split(": ", 1)[1] for line in said.splitlines() if line.startswith("Prepare the photos first:")]
    assert lines == [
        "lorakit prepare photos/close --out dataset-1 --resolution 64 --caption-ext .txt --class-tokens 'ohwx man' "
        "--caption-lines first",
        "lorakit prepare photos/far --out dataset-2 --resolution 64 --caption-ext .txt --class-tokens 'ohwx man' "
        "--caption-lines first",
    ]
    # with kohya's enable_wildcard, a caption file's lines become choices, one per step
    (tmp_path / "wild.toml").write_text(
        TRAINING.format(base=tiny_base, out=tmp_path / "out") + "enable_wildcard = true\n"
    )
    said_wild = ok(["from-kohya", "wild.toml", "--dataset-config", "dataset.toml", "--out", "wild-recipe.toml"]).stdout
    assert load_recipe(tmp_path / "wild-recipe.toml").data.wildcards
    assert said_wild.count("--caption-lines choices") == 2 and "--caption-lines first" not in said_wild
    # every setting of both files is accounted for: 11 of the training config (with --dataset-config), 17 of the
    # dataset config (the training config's caption_extension reaches the prepare lines, as sd-scripts falls back
    # to it); not mapped: 3 not needed, 1 not carried over
    assert "Wrote recipe.toml: 24 of the 28 kohya settings mapped to recipe keys" in said
    assert "not needed in lorakit (3): train_data_dir, enable_bucket in [general], num_repeats in subset 1.3" in said
    # color_aug in every subset: mapped, with the latent cache off (sd-scripts refuses to cache with it)
    assert recipe.data.color_aug and not recipe.train.cache_latents
    assert "cache_latents = false  # color_aug: each step encodes its images" in (tmp_path / "recipe.toml").read_text()
    assert (
        "flip_aug (subset 1.2): differs between subsets (unset in subset 1.1, True in subset 1.2); lorakit sets "
        "data.flip once for the whole dataset" in said
    )
    # the printed lines prepare what the recipe trains on
    for line in lines:
        ok([*shlex.split(line)[1:], "--workers", "1", "--quiet"])
    captions = [json.loads(r)["text"] for r in (tmp_path / "dataset-1" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(captions) == ["ohwx man", "ohwx man", "ohwx man, red shirt"]
    ok(["train", "recipe.toml", "--quiet"])
    adapter = tmp_path / "out" / "two" / "two.safetensors"
    assert adapter.is_file()
    from safetensors import safe_open

    with safe_open(str(adapter), "pt") as f:
        meta = f.metadata()
    dirs = json.loads(meta["ss_dataset_dirs"])
    # the class images are repeated to as many samples as the photos give (3 x 10 + 2 x 3), as kohya does
    assert {k: v["n_repeats"] for k, v in dirs.items()} == {"dataset-1": 10, "dataset-2": 3, "men": 18}


def test_a_dataset_config_it_cannot_read_is_named(tiny_base, tmp_path):
    (tmp_path / "kohya.toml").write_text(TRAINING.format(base=tiny_base, out=tmp_path / "out"))
    args = ["from-kohya", str(tmp_path / "kohya.toml"), "--out", str(tmp_path / "r.toml")]
    fails([*args, "--dataset-config", str(tmp_path / "none.toml")], "none.toml: not found; pass the .toml kohya")
    (tmp_path / "d.toml").write_text("[general]\nshuffle_caption = true\n")
    fails([*args, "--dataset-config", str(tmp_path / "d.toml")], "d.toml: no [[datasets]]; a kohya dataset config")
    (tmp_path / "d.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'meta.json'\n")
    fails([*args, "--dataset-config", str(tmp_path / "d.toml")], "subset 1.1 has no image_dir; lorakit prepares")
    (tmp_path / "d.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 'ten'\n")
    fails([*args, "--dataset-config", str(tmp_path / "d.toml")], "d.toml: a setting has a value of the wrong kind")
    assert not (tmp_path / "r.toml").exists()


def test_older_and_rarer_kohya_settings_are_carried_over(tiny_base, tmp_path):
    config = _config(
        tmp_path,
        tiny_base,
        **{
            'optimizer_type = "Prodigy"': "use_8bit_adam = true",
            "optimizer_args = [": "_unused = [",
            'lr_scheduler = "cosine_with_restarts"': 'lr_scheduler = "warmup_stable_decay"\nlr_decay_steps = 50\n'
            "lr_scheduler_min_lr_ratio = 0.1",
            "lr_scheduler_num_cycles = 3": "lr_scheduler_num_cycles = 1",
            'caption_extension = ".txt"': 'caption_extention = ".caption"\nsecondary_separator = ";;;"\n'
            "weighted_captions = true",
            "full_bf16 = true": 'full_fp16 = true\nsample_at_first = true\ntorch_compile = true\nloss_type = "l1"\n'
            "ip_noise_gamma = 0.1\nip_noise_gamma_random_strength = true\nv_pred_like_loss = 0.2\n"
            "validation_split = 0.1\nvalidation_seed = 5\nvalidate_every_n_epochs = 2\n"
            'save_n_epoch_ratio = 5\nsave_last_n_epochs_state = 4\nwandb_run_name = "x"\n'
            'log_with = "all"\nlog_tracker_name = "toys"\nwandb_api_key = "abc"\n'
            'network_args = ["loraplus_unet_lr_ratio=4", "loraplus_text_encoder_lr_ratio=2"]\n'
            "token_warmup_step = 0.1\ntoken_warmup_min = 2\n"
            'huggingface_repo_id = "me/x"\ncaption_dropout_every_n_epochs = 3\nfp8_base = true\nfp8_base_unet = true',
        },
    )
    recipe_path = tmp_path / "recipe.toml"
    said = ok(["from-kohya", str(config), "--out", str(recipe_path)]).stdout
    recipe = load_recipe(recipe_path)
    train = recipe.train
    assert (train.optimizer, train.compile, train.loss_type, train.v_pred_like_loss) == ("adamw8bit", True, "l1", 0.2)
    assert train.ip_noise_gamma == 0.1 and train.ip_noise_gamma_random_strength
    assert (train.lr_scheduler, train.lr_decay_steps, train.lr_scheduler_min_lr_ratio) == (
        "warmup_stable_decay",
        50,
        0.1,
    )
    assert recipe.sample.at_first and recipe.data.secondary_separator == ";;;" and recipe.data.weighted_captions
    assert 'optimizer = "adamw8bit"  # use_8bit_adam' in recipe_path.read_text()
    assert "--caption-ext .caption" in said  # sd-scripts' first spelling of caption_extension
    assert "_unused: lorakit has no equivalent" in said
    assert (train.save_every_epochs, train.keep_checkpoints, recipe.data.caption_dropout_every_epochs) == (
        2,
        4,
        3,
    )  # 10 epochs / 5 saves; the states kept
    assert "wandb_run_name" in said.split("not needed in lorakit")[1].split("\n")[0]
    assert (recipe.output.log_with, recipe.output.wandb_project) == (["tensorboard", "wandb"], "toys")
    assert (train.loraplus_unet_lr_ratio, train.loraplus_text_encoder_lr_ratio) == (4, 2)
    assert (recipe.data.caption_warmup_steps, recipe.data.caption_warmup_min) == (0.1, 2)
    assert "wandb_api_key: lorakit keeps no API keys in recipes; run `wandb login`" in said
    assert "abc" not in said and "abc" not in recipe_path.read_text()
    assert "huggingface_repo_id: lorakit does not upload; push the run folder with `hf upload`" in said
    assert "full_fp16: lorakit trains the adapter in float32, or in bfloat16 with full_bf16 (train.full_bf16)" in said
    assert not train.full_bf16
    assert (recipe.validation.split, recipe.validation.seed) == (0.1, 5)
    # fp8_base with fp8_base_unet: the U-Net in float8 and the text encoders not, as sd-scripts stores them
    assert (recipe.model.weight_dtype, recipe.model.float8_text_encoders) == ("float8", False)
    # sd-scripts validates by epochs unless told otherwise, and by steps only when told
    assert (recipe.validation.every_epochs, recipe.validation.every_steps) == (2, 0)
    # sd-scripts refuses two optimizers; the one it would complain about is named
    config = _config(
        tmp_path, tiny_base, **{'optimizer_type = "Prodigy"': "use_8bit_adam = true\nuse_lion_optimizer = true"}
    )
    said = ok(["from-kohya", str(config), "--out", str(tmp_path / "two.toml")]).stdout
    assert "use_lion_optimizer: sd-scripts refuses it beside use_8bit_adam; use_8bit_adam kept" in said
    # a bitsandbytes class by its full path, as sd-scripts' help suggests for AdEMAMix
    config = _config(
        tmp_path, tiny_base, **{'optimizer_type = "Prodigy"': 'optimizer_type = "bitsandbytes.optim.AdEMAMix8bit"'}
    )
    ok(["from-kohya", str(config), "--out", str(tmp_path / "ademamix.toml")])
    assert load_recipe(tmp_path / "ademamix.toml").train.optimizer == "ademamix8bit"


def test_a_textual_inversion_config_becomes_an_embedding_alone_that_trains(tiny_base, tiny_dataset, tmp_path):
    config = tmp_path / "ti.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{tiny_base}"\ntoken_string = "ohwx"\ninit_word = "toy"\n'
        f"num_vectors_per_token = 2\nlearning_rate = 0.005\nmax_train_steps = 2\nuse_object_template = true\n"
        f'output_dir = "{tmp_path / "out"}"\noutput_name = "myword"\n',
        encoding="utf-8",
    )
    recipe_path = tmp_path / "recipe.toml"
    said = ok(["from-kohya", str(config), "--out", str(recipe_path)]).stdout
    recipe = load_recipe(recipe_path)
    embedding = recipe.embedding
    assert (embedding.token, embedding.only, embedding.vectors, embedding.init_words, embedding.lr) == (
        "ohwx",
        True,
        2,
        "toy",
        0.005,
    )
    assert recipe.data.trigger == "ohwx"
    assert "use_object_template: lorakit trains on your captions" in said
    args = [
        "train",
        str(recipe_path),
        "--quiet",
        "--set",
        f"data.folder={tiny_dataset}",
        "--set",
        "data.resolution=64",
    ]
    ok(args)
    assert (tmp_path / "out" / "myword" / "embeddings" / "ohwx.safetensors").is_file()


def test_a_schedule_free_config_keeps_its_warm_up_and_drops_the_schedule_kohya_ignores(tiny_base, tmp_path):
    """sd-scripts gives a schedule-free optimizer a schedule that does nothing and passes it no lr_warmup_steps; its
    warm-up is `optimizer_args warmup_steps`. The recipe keeps that, trains without a schedule, and says so."""
    config = _config(
        tmp_path,
        tiny_base,
        **{
            'optimizer_type = "Prodigy"': 'optimizer_type = "AdamWScheduleFree"',
            '"d_coef=2", "use_bias_correction=True", "safeguard_warmup=True", "decouple=True", ': (
                '"warmup_steps=20", '
            ),
            "lr_warmup_steps = 0.1": "lr_warmup_steps = 50",
        },
    )
    recipe_path = tmp_path / "recipe.toml"
    said = ok(["from-kohya", str(config), "--out", str(recipe_path)]).stdout
    train = load_recipe(recipe_path).train
    assert (train.optimizer, train.lr_warmup_steps, train.lr_scheduler) == ("adamw_schedulefree", 20, "constant")
    assert "lr_scheduler: sd-scripts does not use it with AdamWScheduleFree (no schedule; its warm-up is" in said
    assert "lr_warmup_steps: sd-scripts does not use it with AdamWScheduleFree" in said


def test_kohya_toml_and_json_prompt_files_become_sample_prompts(tiny_base, tmp_path):
    """sd-scripts' .toml prompt file ([prompt] settings that each [[prompt.subset]] overrides) and .json one (a list of
    prompt tables) give the same `[sample] prompts` lines as the .txt form with inline options."""
    import json

    (tmp_path / "prompts.toml").write_text(
        '[prompt]\nwidth = 512\nheight = 768\nscale = 6.5\nsample_steps = 24\nnegative_prompt = "blurry"\n\n'
        '[[prompt.subset]]\nprompt = "ohwx man at the beach"\nseed = 7\n\n'
        '[[prompt.subset]]\nprompt = "ohwx man portrait"\nwidth = 768\nsample_sampler = "euler_a"\n',
        encoding="utf-8",
    )
    entries = [
        {"prompt": "ohwx man at the beach", "width": 512, "height": 768, "seed": 7, "scale": 6.5},
        {"prompt": "ohwx man portrait", "negative_prompt": "blurry", "controlnet_image": "c.png"},
        "ohwx man smiling --s 20",
    ]
    (tmp_path / "prompts.json").write_text(json.dumps(entries), encoding="utf-8")
    recipe_path = tmp_path / "recipe.toml"
    config = _config(tmp_path, tiny_base, **{'sample_prompts = "prompts.txt"': 'sample_prompts = "prompts.toml"'})
    said = ok(["from-kohya", str(config), "--out", str(recipe_path)]).stdout
    assert load_recipe(recipe_path).sample.prompts == [
        "ohwx man at the beach --w 512 --h 768 --l 6.5 --s 24 --n blurry --d 7",
        "ohwx man portrait --w 768 --h 768 --l 6.5 --s 24 --n blurry",
    ]
    assert "sample_prompts sample_sampler: lorakit draws every sample with one sampler, sample.sampler" in said
    config = _config(tmp_path, tiny_base, **{'sample_prompts = "prompts.txt"': 'sample_prompts = "prompts.json"'})
    said = ok(["from-kohya", str(config), "--out", str(recipe_path), "--overwrite"]).stdout
    assert load_recipe(recipe_path).sample.prompts == [
        "ohwx man at the beach --w 512 --h 768 --d 7 --l 6.5",
        "ohwx man portrait --n blurry",
        "ohwx man smiling --s 20",
    ]
    assert "sample_prompts controlnet_image: not a sample prompt setting lorakit has" in said


def test_in_json_becomes_the_kohya_metadata_of_the_prepare_line(tiny_base, tmp_path):
    config = _config(tmp_path, tiny_base, **{'dataset_config = ""': 'in_json = "meta cap.json"'})
    said = ok(["from-kohya", str(config), "--out", str(tmp_path / "recipe.toml")]).stdout
    line = next(line for line in said.splitlines() if line.startswith("Prepare the photos first:"))
    assert "--kohya-metadata 'meta cap.json'" in line
    assert "in_json:" not in said and "metadata_file:" not in said  # mapped, not left out


def test_datasets_that_repeat_their_subsets_at_other_resolutions_become_extra_resolutions(tiny_base, tmp_path):
    """kohya's multi-resolution training: the same subsets in [[datasets]] of 64 and 32 px become one prepare line
    per subset, at the largest, and data.extra_resolutions."""
    subsets = '  [[datasets.subsets]]\n  image_dir = "photos/a"\n  num_repeats = 4\n\n'
    subsets += '  [[datasets.subsets]]\n  image_dir = "photos/b"\n  class_tokens = "ohwx man"\n\n'
    dataset = "".join(f"[[datasets]]\nresolution = {side}\nbatch_size = 2\n\n{subsets}" for side in (32, 64))
    (tmp_path / "dataset.toml").write_text(dataset)
    (tmp_path / "kohya.toml").write_text(TRAINING.format(base=tiny_base, out=tmp_path / "out"))
    said = ok(
        [
            "from-kohya",
            str(tmp_path / "kohya.toml"),
            "--dataset-config",
            str(tmp_path / "dataset.toml"),
            "--out",
            str(tmp_path / "recipe.toml"),
        ]
    ).stdout
    recipe = load_recipe(tmp_path / "recipe.toml")
    assert (recipe.data.resolution, recipe.data.extra_resolutions) == (64, [32])
    assert (recipe.data.folder, recipe.data.num_repeats) == (["dataset-1", "dataset-2"], [4, 1])
    lines = [line.split(": ", 1)[1] for line in said.splitlines() if line.startswith("Prepare the photos first:")]
    assert len(lines) == 2 and all("--resolution 64" in line for line in lines)
    assert "differs between subsets" not in said  # the resolutions are carried over, not reported


def test_dim_from_weights_takes_the_rank_and_alpha_of_the_network_weights_file(tiny_base, trained_run, tmp_path):
    config = _config(
        tmp_path,
        tiny_base,
        **{"network_dim = 8": f'network_dim = 8\nnetwork_weights = "{trained_run.adapter}"\ndim_from_weights = true'},
    )
    said = ok(["from-kohya", str(config), "--out", str(tmp_path / "recipe.toml")]).stdout
    recipe = load_recipe(tmp_path / "recipe.toml")
    assert (recipe.lora.rank, recipe.lora.lora_alpha, recipe.lora.init_from) == (4, 8.0, str(trained_run.adapter))
    assert "dim_from_weights:" not in said  # carried over, nothing left out
    missing = _config(tmp_path, tiny_base, **{"network_dim = 8": "network_dim = 8\ndim_from_weights = true"})
    said = ok(["from-kohya", str(missing), "--out", str(tmp_path / "other.toml")]).stdout
    assert "dim_from_weights: there is no network_weights file to take the rank from" in said


def test_conv_block_dims_are_carried_over_where_sd_scripts_reads_them(tiny_base, tmp_path):
    """sd-scripts reads conv_block_dims / conv_block_alphas only beside block_dims or block-wise rates."""
    old = 'network_args = ["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1", "dylora_unit=4"]'
    read = 'network_args = ["block_dims=4,4,4,4,4,4,4,4,4", "conv_block_dims=0,3,0,5", "conv_block_alphas=1,3,1,2"]'
    config = _config(tmp_path, tiny_base, **{old: read})
    recipe_path = tmp_path / "recipe.toml"
    ok(["from-kohya", str(config), "--out", str(recipe_path)])
    lora = load_recipe(recipe_path).lora
    assert lora.target_modules == "transformer+conv"
    assert (lora.conv_block_ranks, lora.conv_block_alphas) == ([0, 3, 0, 5], [1.0, 3.0, 1.0, 2.0])
    ignored = 'network_args = ["conv_block_dims=0,3,0,5"]'
    said = ok(["from-kohya", str(_config(tmp_path, tiny_base, **{old: ignored})), "--out", str(tmp_path / "b.toml")])
    assert "conv_block_dims: sd-scripts reads it only beside block_dims or block-wise rates" in said.stdout
    assert load_recipe(tmp_path / "b.toml").lora.conv_block_ranks is None


def test_a_datasets_network_multiplier_becomes_its_folders_adapter_strength(tiny_base, tmp_path):
    """kohya's [[datasets]] network_multiplier (the network's multiplier on that dataset's images): an image slider's
    +1 / -1 datasets become data.adapter_strength, one per folder."""
    dataset = "".join(
        f'[[datasets]]\nresolution = 64\nnetwork_multiplier = {m}\n\n  [[datasets.subsets]]\n  image_dir = "{d}"\n\n'
        for d, m in (("photos/after", 1.0), ("photos/before", -1.0))
    )
    (tmp_path / "dataset.toml").write_text(dataset)
    (tmp_path / "kohya.toml").write_text(TRAINING.format(base=tiny_base, out=tmp_path / "out"))
    args = ["from-kohya", str(tmp_path / "kohya.toml"), "--dataset-config", str(tmp_path / "dataset.toml")]
    said = ok([*args, "--out", str(tmp_path / "recipe.toml")]).stdout
    recipe = load_recipe(tmp_path / "recipe.toml")
    assert (recipe.data.folder, recipe.data.adapter_strength) == (["dataset-1", "dataset-2"], [1.0, -1.0])
    assert "network_multiplier" not in said  # carried over: not named among what is left out
    assert "network_multiplier (dataset_config)" in (tmp_path / "recipe.toml").read_text()  # where it came from


def test_random_crop_becomes_a_kept_margin_and_uncached_latents(tiny_base, tmp_path):
    """sd-scripts' random_crop (which refuses cached latents): data.random_crop with the latent cache off, and the
    prepare line keeps the margin a crop moves in."""
    config = tmp_path / "crop.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{tiny_base}"\ntrain_data_dir = "/data/img"\nresolution = 64\n'
        f'random_crop = true\ncolor_aug = true\noutput_dir = "{tmp_path / "out"}"\n',
        encoding="utf-8",
    )
    said = ok(["from-kohya", str(config), "--out", str(tmp_path / "recipe.toml")]).stdout
    recipe = load_recipe(tmp_path / "recipe.toml")
    assert recipe.data.random_crop and recipe.data.color_aug and not recipe.train.cache_latents
    assert "cache_latents = false  # color_aug: each step encodes its images" in (tmp_path / "recipe.toml").read_text()
    assert "lorakit prepare /data/img --out dataset --resolution 64 --keep-margin" in said


def test_a_d_adaptation_config_becomes_prodigy_and_says_so(tiny_base, tmp_path):
    """sd-scripts' DAdaptAdam (and the rest of the dadaptation package) is not in lorakit; Prodigy, its successor with
    the same rate of 1.0, is. The config's rates and Adam settings are kept, and the change is listed on its own."""
    config = _config(
        tmp_path,
        tiny_base,
        **{
            'optimizer_type = "Prodigy"': 'optimizer_type = "DAdaptAdam"',
            '"d_coef=2", "use_bias_correction=True", "safeguard_warmup=True", ': '"betas=0.9,0.99", ',
            "learning_rate = 0.5": "learning_rate = 1.0",
        },
    )
    recipe_path = tmp_path / "recipe.toml"
    said = ok(["from-kohya", str(config), "--out", str(recipe_path)]).stdout
    train = load_recipe(recipe_path).train
    assert (train.optimizer, train.unet_lr, train.text_encoder_lr) == ("prodigy", 1.0, 1.0)
    assert (train.betas, train.weight_decay) == ([0.9, 0.99], 0.01)
    changed = said.split("carried over with a change (1):\n")[1].splitlines()[0]
    assert "optimizer_type: 'DAdaptAdam' became prodigy, D-Adaptation's successor" in changed
    assert "optimizer_type" not in said.split("not carried over")[-1]


def test_an_optimizer_it_cannot_carry_leaves_adaptive_rates_behind(tiny_base, tmp_path):
    """An optimizer lorakit lacks becomes adamw8bit; a rate of 1.0 given for the other one would make it diverge, so
    the recipe takes lorakit's default rates and names each rate it left."""
    config = _config(
        tmp_path,
        tiny_base,
        **{
            'optimizer_type = "Prodigy"': 'optimizer_type = "CAME"',
            "learning_rate = 0.5": "learning_rate = 1.0\ntext_encoder_lr = 2e-5",
        },
    )
    recipe_path = tmp_path / "recipe.toml"
    said = ok(["from-kohya", str(config), "--out", str(recipe_path)]).stdout
    train = load_recipe(recipe_path).train
    assert (train.optimizer, train.unet_lr, train.text_encoder_lr) == ("adamw8bit", 1e-4, 2e-5)
    assert "unet_lr = 1: a rate for an optimizer that sizes its own steps (D-Adaptation, Prodigy), at which" in said
    assert "lorakit's default train.unet_lr kept" in said and "text_encoder_lr = " not in said
    assert "# unet_lr" not in recipe_path.read_text()
