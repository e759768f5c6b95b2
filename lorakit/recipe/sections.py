"""The recipe's sections: one frozen dataclass per TOML section. Defaults live only here; the docstring under
each field documents it (README's key table and `field_docs` read them)."""

from __future__ import annotations

import ast
import inspect
import typing
from dataclasses import dataclass, field
from typing import Literal

Optimizer = Literal[
    "adamw8bit", "adamw", "adafactor", "prodigy", "lion8bit", "lion", "adamw_schedulefree", "ademamix8bit"
]
LrScheduler = Literal[
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "inverse_sqrt",
]
MixedPrecision = Literal["no", "fp16", "bf16"]
Tracker = Literal["tensorboard", "wandb"]
PredictionType = Literal["epsilon", "v_prediction"]
SaveDtype = Literal["float32", "float16", "bfloat16"]
TargetPreset = Literal["attention", "transformer", "transformer+conv"]
WeightDtype = Literal["float32", "float16", "bfloat16", "float8"]
AUTOCAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # train.mixed_precision -> the dtype autocast computes in
LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
TimestepBias = Literal["none", "earlier", "later", "range"]
Sampler = Literal["euler", "euler_a", "dpmpp_2m", "ddim"]
TokenLength = Literal[75, 150, 225]
AdapterType = Literal["lora", "lokr", "loha"]
DEFAULT_MAX_STEPS = 1000  # a run's length when neither train.max_steps nor train.max_epochs is set


@dataclass(frozen=True)
class ModelSection:
    base: str
    """The base model: a diffusers folder (local path), a Hugging Face hub id, or a single-file `.safetensors`
    checkpoint. A value that exists on disk or starts with `./`, `/` or `~` is a local path and must exist."""
    prediction_type: PredictionType | None = None
    """What the U-Net predicts; read from the base model's scheduler when unset (SD 2.x 768 models use
    `v_prediction`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `base`; ignored for local folders."""
    config: str | None = None
    """For a single-file `base` (`.safetensors`): a diffusers folder or hub id of the same architecture whose
    component configs and tokenizers are used to read it. Needed for SD 1.x/2.x files; SDXL files use lorakit's
    shipped configs and the cached SDXL tokenizers without it."""
    vae: str | None = None
    """A replacement VAE (a diffusers AutoencoderKL folder or hub id), e.g. stabilityai/sd-vae-ft-mse."""
    weight_dtype: WeightDtype = "float32"
    """dtype of the frozen base weights: `float16` / `bfloat16` halve their memory (LoRA weights stay float32).
    `float8` (kohya's `fp8_base`) halves it again: the U-Net's and text encoders' Linear and Conv2d weights are
    stored as float8 e4m3 with a scale per output channel and computed in `train.mixed_precision`'s dtype (float32
    without it), as the rest of the base is (norms, biases, embeddings; the VAE stays float32). Not with DoRA."""
    float8_text_encoders: bool = True
    """With `weight_dtype = "float8"`: store the text encoders in float8 too (kohya's `fp8_base`); false keeps them
    in the compute dtype and stores the U-Net alone (kohya's `fp8_base_unet`), e.g. when they train."""
    clip_skip: int = 1
    """Use the output of the N-th last text-encoder layer (kohya's clip_skip: 2 for anime-style SD 1.x bases); the
    last N - 1 layers then get no adapter (their output never reaches the U-Net). Not defined for SDXL."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule so its last timestep is pure noise (Lin et al. 2024, arXiv:2305.08891), as
    v-prediction bases trained that way expect (NoobAI-XL v-pred); needs v-prediction."""
    merged_adapters: list[str] = field(default_factory=list)
    """Adapter files merged into the frozen base before training (kohya's `base_weights`), each `path` or
    `path:scale`, e.g. ["style.safetensors:0.8"]: the new adapter learns on top of them and is meant to be used
    with them (`lorakit generate --lora RUN_FOLDER` merges them too). LoRA, LoKr or LoHa; kohya or diffusers
    layout."""


@dataclass(frozen=True)
class DataSection:
    folder: str | list[str] = "dataset"
    """The dataset folder written by `lorakit prepare` (images, `metadata.jsonl`), or a list of such folders."""
    resolution: int = 512
    """Training resolution in pixels; images are trained in aspect-ratio buckets of about this area."""
    extra_resolutions: list[int] = field(default_factory=list)
    """Also train every image at these resolutions (multi-resolution training, as ai-toolkit's list of resolutions):
    each is another copy of the dataset in its own buckets, so an epoch is that many times longer. Prepare at the
    largest: a smaller one only downscales. E.g. [768, 512] beside resolution = 1024. A `[slider]` draws each step's
    latents at one of `resolution` and these."""
    num_repeats: int | list[int] = 1
    """How many times each image appears per epoch; a list gives each folder of `folder` its own. A dataset row's own
    `repeats` (`prepare --kohya-folders`) multiplies it."""
    adapter_strength: float | list[float] = 1.0
    """The adapter's strength while it trains on each folder's images: one number, or one per folder of `folder`.
    [1, -1] with photos showing a change in the first folder and the same subjects without it in the second trains an
    image slider (ai-toolkit's image-pair slider): at +1 the adapter draws the first kind, at -1 the second, at 0 the
    base. Each image's forward pass runs the adapter at its folder's strength. LoRA only, not with DoRA."""
    pairs: bool = False
    """Image sliders: the two folders of `folder` show the same scenes under the same photo names, and each image
    trains beside its namesake from the other folder, in one micro-batch with the same noise, timestep and flip
    (ai-toolkit's paired image slider), so what the adapter learns is what differs between the two. Needs two
    folders at different `adapter_strength`s, the same `num_repeats` for both and an even `train.batch_size` (a
    batch holds batch_size / 2 pairs); every photo needs its namesake, at the same aspect ratio."""
    trigger: str = ""
    """Trigger word(s) put at the front of every caption that does not already contain them."""
    shuffle_tags: bool = False
    """Shuffle the comma-separated tags of each caption every step (after the first `keep_tokens` tags)."""
    keep_tokens: int = 0
    """How many leading tags stay in place when `shuffle_tags` is on (kohya's name; counts tags, not tokens)."""
    keep_tokens_separator: str = ""
    """kohya's `keep_tokens_separator`, e.g. "|||": in a caption `ohwx, 1girl ||| smile, outdoors ||| best quality`
    the tags before the first separator and after a second one stay in place and are never dropped, the rest
    shuffle and drop out; the separators are removed. Captions without one use `keep_tokens`."""
    weighted_captions: bool = False
    """kohya's `weighted_captions`: `(red hair:1.2)` in a caption multiplies the text-encoder output of its tokens by
    1.2 (`(x)` by 1.1, `[x]` by 1/1.1, the webui's syntax), as kohya does it: without restoring the mean. The
    brackets are not encoded. Tags shuffle and drop out first, so keep commas out of a bracket."""
    secondary_separator: str = ""
    """kohya's `secondary_separator`, e.g. ";;;": tags joined by it (`red hair;;;long hair`) shuffle and drop out
    together, as one tag, and are then separated by a comma like the rest."""
    caption_dropout: float = 0.0
    """Probability of training a step's image with an empty caption (0 to 1)."""
    caption_dropout_every_epochs: int = 0
    """Train every image with an empty caption in every this many-th epoch (kohya's
    `caption_dropout_every_n_epochs`: epochs N, 2N, ... counted from 1); 0 is off."""
    wildcards: bool = False
    """kohya's `enable_wildcard`: each `{red shirt|blue shirt|green shirt}` in a caption becomes one of its options
    at every step (drawn with the step's seed), so several phrasings of one photo are learned (`{{` and `}}` are
    literal braces; `lorakit prepare --caption-lines choices` turns caption files of several lines into such
    choices); `val_loss` uses the first option. Shuffling and `keep_tokens` then count the chosen option's tags."""
    masked_loss: bool = False
    """Weight the denoising loss by each image's mask (`mask_file_name` in metadata.jsonl: white is the subject):
    the subject counts fully, the rest by `mask_background_weight`, so the background is not learned as the
    subject. Images without a mask train unmasked (their count is logged)."""
    mask_background_weight: float = 0.1
    """Loss weight of the masked-out area (0 to 1) with `masked_loss`; 0 ignores it entirely."""
    caption_dropout_tags: float = 0.0
    """Probability of leaving out each tag of a caption at a step (0 to 1), so that a tag every photo shares ("black
    background") is not always bound to the subject. The trigger and the first `keep_tokens` tags always stay."""
    flip: bool = False
    """Randomly mirror images left-right (do not use for asymmetric subjects such as text or faces with a parting)."""
    random_crop: bool = False
    """kohya's `random_crop`: each step crops an image at a random place of its margin instead of the centre (the
    margin is what covering the bucket leaves over; `lorakit prepare --keep-margin` keeps it, a plain prepare crops
    it away). Needs `train.cache_latents = false`."""
    color_aug: bool = False
    """kohya's `color_aug`: at each step a third of the images change colour, half of those by a hue rotation of up
    to 16 degrees either way, the others by a gamma of 0.95 to 1.05 (on the 0-1 scale; sd-scripts raises the 0-255
    values themselves), so the adapter learns the subject rather than one photo's white balance. Needs
    `train.cache_latents = false`: cached latents are encoded once, and each step then encodes its images."""
    caption_warmup_steps: float = 0.0
    """kohya's `token_warmup_step`: during this many optimizer steps (a share of the run when below 1) each caption
    grows from `caption_warmup_min` tags after the kept ones to all of them, in order, so the first steps learn the
    subject from its leading tags alone; 0 is off. The trigger always stays."""
    caption_warmup_min: int = 1
    """kohya's `token_warmup_min`: the tags after the kept ones a caption starts its warm-up with."""
    max_token_length: TokenLength = 75
    """Caption length in CLIP tokens: 75 truncates longer captions (counted and reported); 150 or 225 encode them
    in 75-token chunks, as kohya's max_token_length does."""

    @property
    def strengths(self) -> list[float]:
        """`adapter_strength` for each folder of `folder`."""
        count = 1 if isinstance(self.folder, str) else len(self.folder)
        strength = self.adapter_strength
        return list(strength) if isinstance(strength, list) else [strength] * count

    @property
    def strengths_vary(self) -> bool:
        """Whether some folder trains at another adapter strength than 1 (an image slider)."""
        return any(s != 1 for s in self.strengths)

    @property
    def tags_vary(self) -> bool:
        """Whether a caption's tags change from step to step (shuffled, left out one by one, wildcards chosen, or
        growing through a warm-up), so its text-encoder output cannot be computed once and cached."""
        return bool(self.shuffle_tags or self.caption_dropout_tags or self.wildcards or self.caption_warmup_steps)


@dataclass(frozen=True)
class LoraSection:
    type: AdapterType = "lora"
    """`lora`, `lokr` (LyCORIS LoKr: a Kronecker product of two small factors; small files) or `loha` (LyCORIS
    LoHa: the elementwise product of two low-rank products). LoKr/LoHa are trained with peft's LoKr/LoHa and saved
    in the LyCORIS kohya layout, which A1111/Forge and ComfyUI load (diffusers cannot)."""
    rank: int = 16
    """Adapter rank: the width of each adapter; larger learns more detail and makes bigger files. LoKr: a rank of at
    least half the larger side of a Kronecker factor keeps that factor whole (e.g. 10000: full-rank LoKr)."""
    lora_alpha: float = 16.0
    """The adapter's update is scaled by `lora_alpha / rank` (LoKr/LoHa too, as peft trains them)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (0 to 1); LoRA only (peft's LoKr/LoHa have none)."""
    neuron_dropout: float = 0.0
    """kohya's `network_dropout`: while training, each value of each LoRA down projection's output is dropped with
    this probability (the rest scaled up to match); 0.1 is usual, 0 is off. LoRA only, not with DoRA."""
    rank_dropout: float = 0.0
    """kohya's `rank_dropout`: while training, each rank of each LoRA module is dropped with this probability per
    sample (the rest scaled up to match), so no single rank carries the subject; 0.1 is usual, 0 is off. LoRA
    only, not with DoRA."""
    module_dropout: float = 0.0
    """kohya's `module_dropout`: while training, each LoRA module is switched off for a whole forward pass with this
    probability; 0.1 is usual, 0 is off. A module off in every micro-batch of a step gets no update at all that step
    (no momentum, no weight decay), as in kohya. LoRA only, not with DoRA."""
    decompose_factor: int = -1
    """LoKr: the Kronecker split of each side (LyCORIS' `factor`): -1 splits into the two most balanced factors,
    N makes one factor N wide (smaller N, smaller files)."""
    decompose_both: bool = False
    """LoKr: also decompose the first (small) Kronecker factor into a low-rank product."""
    use_effective_conv2d: bool = False
    """LoKr/LoHa with 3x3 convolutions (`transformer+conv`): a Tucker core per kernel (LyCORIS' `use_tucker`)
    instead of flat factors."""
    target_modules: TargetPreset | list[str] = "transformer"
    """Where adapters go: `transformer` (every Linear and 1x1 conv in the U-Net's transformer blocks, and CLIP
    attention + MLP: kohya's default), `attention` (q/k/v/out only), `transformer+conv` (also the ResNet and
    resampler convolutions: LoCon), or a list of module names."""
    use_dora: bool = False
    """DoRA (peft's weight decomposition: a trained magnitude per output row on top of the low-rank direction).
    Saved in the diffusers layout only: A1111/Forge and ComfyUI apply kohya-layout DoRA on the other axis."""
    conv_rank: int | None = None
    """Rank of the 3x3 convolution adapters with `transformer+conv` (default: `rank`)."""
    conv_alpha: float | None = None
    """Alpha of the 3x3 convolution adapters with `transformer+conv` (default: `lora_alpha`)."""
    train_text_encoder: bool | None = None
    """Also adapt the text encoder(s); default true for SD 1.x and 2.x (false with `[slider]`)."""
    block_ranks: list[int] | None = None
    """kohya's `block_dims`: a rank per U-Net block, IN00 to IN11, M00, OUT00 to OUT11 for SD 1.x/2.x (25 values;
    SDXL IN00-IN08, M00, OUT00-OUT08, 19, or kohya's own SDXL list of 23: a place for the time embedding, the nine
    input blocks, the middle block's ResNet, attention and ResNet, the nine output blocks and a place for the output
    layer). A block at 0 gets no adapter; the text encoders and the U-Net's modules outside the blocks keep `rank`.
    LoRA only."""
    block_alphas: list[float] | None = None
    """kohya's `block_alphas`: an alpha per U-Net block, in the order of `block_ranks`; unset: `lora_alpha`."""
    conv_block_ranks: list[int] | None = None
    """kohya's `conv_block_dims`: a rank per U-Net block for the 3x3 convolutions of `transformer+conv` (LoCon), in
    the order and number of `block_ranks`' values; a block at 0 gets no convolution adapter. Unset: `conv_rank`
    (and a block that `block_ranks` sets to 0 has none). LoRA only."""
    conv_block_alphas: list[float] | None = None
    """kohya's `conv_block_alphas`: an alpha per U-Net block for the 3x3 convolutions, in the order of
    `conv_block_ranks`; unset: `conv_alpha`."""
    init_from: str | None = None
    """Start from an existing LoRA file (kohya or diffusers layout, same targets) instead of zero; not a resume."""
    tlora_min_rank: int | None = None
    """T-LoRA (timestep-dependent rank): U-Net adapters use only their first `floor(((T - t) / T) ** tlora_exponent
    * (rank - tlora_min_rank)) + tlora_min_rank` ranks at timestep t of T: all of them on almost clean images, this
    many on pure noise, where layout and background are decided. Less of the photos' layout is learned. The file is
    an ordinary LoRA; `lorakit generate` draws it under the same schedule (other loaders use every rank)."""
    tlora_exponent: float = 1.0
    """T-LoRA: the schedule's curve (SimpleTuner's `tlora_alpha`): 1 is linear, above 1 keeps more ranks off until
    the last, low-noise steps."""


@dataclass(frozen=True)
class TrainSection:
    max_steps: int | None = None
    """Length of the run in optimizer steps (each of `batch_size x gradient_accumulation_steps` images per process);
    unset: 1000, or what `max_epochs` works out to."""
    max_epochs: int | None = None
    """Length of the run in epochs (kohya's `max_train_epochs`; an epoch shows every image `repeats` times): the
    steps are worked out from the dataset, ceil(epochs x batches per epoch / `gradient_accumulation_steps`), and
    logged. A recipe that also sets `max_steps` must agree with it."""
    batch_size: int = 1
    """Images per micro-batch on each process; a batch always comes from one aspect-ratio bucket."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""
    unet_lr: float = 1e-4
    """Learning rate of the U-Net adapter."""
    text_encoder_lr: float = 5e-5
    """Learning rate of the text-encoder adapter(s)."""
    text_encoder_2_lr: float | None = None
    """SDXL: learning rate of the second text encoder's adapter (OpenCLIP ViT-bigG; kohya's second
    `text_encoder_lr` value); unset: `text_encoder_lr`. Only with `lora.train_text_encoder = true`."""
    text_encoder_until: float = 1.0
    """The share of the run's steps during which the text-encoder adapters learn; after it their rate is 0 and the
    U-Net's adapter goes on alone (OneTrainer's "stop training after" for the text encoder, kohya's
    `stop_text_encoder_training` in its DreamBooth script), e.g. 0.5: a text encoder trained the whole run often
    overfits the captions first. Only with `lora.train_text_encoder = true`."""
    lr_scheduler: LrScheduler = "constant"
    """Learning-rate schedule over `max_steps`: `cosine_with_min_lr` falls along a cosine to
    `lr_scheduler_min_lr_ratio` of the rate instead of 0; `warmup_stable_decay` holds the rate after the warm-up and
    lowers it along a cosine over the last `lr_decay_steps`; `inverse_sqrt` falls as one over the square root of the
    steps (`lr_scheduler_timescale`), whatever `max_steps` is (all as kohya and transformers shape them)."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up at the start of the schedule."""
    lr_scheduler_num_cycles: int = 1
    """`cosine_with_restarts`: how many times the cosine falls to 0 and restarts (kohya's
    `lr_scheduler_num_cycles`; 1 is plain cosine)."""
    lr_scheduler_power: float = 1.0
    """`polynomial`: the power of the decay to 0 (kohya's `lr_scheduler_power`; 1 is linear)."""
    lr_scheduler_min_lr_ratio: float = 0.0
    """`cosine_with_min_lr` / `warmup_stable_decay`: the share of the learning rate the schedule ends at (kohya's
    `lr_scheduler_min_lr_ratio`), e.g. 0.1."""
    lr_decay_steps: int = 0
    """`warmup_stable_decay`: how many of the last optimizer steps lower the rate (kohya's `lr_decay_steps`), at most
    the steps after the warm-up."""
    lr_scheduler_timescale: int | None = None
    """`inverse_sqrt`: after the warm-up the rate falls as 1 / sqrt((step + timescale - warm-up) / timescale)
    (kohya's `lr_scheduler_timescale`); unset: `lr_warmup_steps`, or 10000 without a warm-up (as transformers)."""
    optimizer: Optimizer = "adamw8bit"
    """`adamw8bit` (bitsandbytes, 8-bit state), `adamw`, `adafactor`, `prodigy` (needs `pip install prodigyopt`;
    use learning rates of 1.0), or `lion8bit` / `lion` (bitsandbytes; one momentum buffer, so half AdamW's state:
    use a learning rate 3-10x lower and a weight decay 3-10x higher than AdamW's), or `adamw_schedulefree`
    (schedule-free AdamW, needs `pip install schedulefree`: no schedule, the warm-up is `lr_warmup_steps`, the
    adapter saved, sampled and validated is the optimizer's running average of the weights; use about 3x AdamW's
    learning rate), or `ademamix8bit` (bitsandbytes' AdEMAMix, Pagliardini et al. 2024, arXiv:2409.03137: AdamW
    with a second, slow momentum mixed in at 5x, 8-bit state, 3 bytes per parameter; AdamW's learning rate)."""
    weight_decay: float = 1e-2
    """Decoupled weight decay of the optimizer."""
    betas: list[float] | None = None
    """The optimizer's two momentum coefficients (kohya's `optimizer_args betas=0.9,0.99`) for AdamW (schedule-free
    too), Lion, Prodigy and AdEMAMix (whose slow momentum keeps 0.9999); unset: each optimizer's own (0.9, 0.999;
    Lion 0.9, 0.99)."""
    prodigy_d_coef: float = 1.0
    """Prodigy: scales the step size it finds (kohya's `d_coef`); above 1 learns faster, below 1 gentler."""
    prodigy_use_bias_correction: bool = False
    """Prodigy: Adam's bias correction (kohya's `use_bias_correction`), often turned on for LoRA."""
    prodigy_safeguard_warmup: bool = False
    """Prodigy: keep the step-size estimate from growing too fast during warm-up (kohya's `safeguard_warmup`)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value; 0 turns clipping off."""
    mixed_precision: MixedPrecision = "no"
    """Autocast precision: `fp16` or `bf16` on CUDA. On a CPU fp16 does nothing: it runs bf16 where the CPU computes
    bf16 natively, else float32, and says so."""
    full_bf16: bool = False
    """kohya's `full_bf16`: the trained tensors (the LoRA, and `[embedding]`'s token vectors) and their gradients are
    bfloat16 too, 2 + 2 bytes per value instead of 4 + 4 (1.27 GiB less for an SDXL U-Net LoRA of rank 128). Needs
    `mixed_precision = "bf16"`. 8-bit optimizers keep their 8-bit state, while AdamW's, Prodigy's and schedule-free
    AdamW's own state becomes bfloat16 too. Each step is rounded stochastically (`stochastic_rounding`)."""
    stochastic_rounding: bool | None = None
    """With `full_bf16`: each optimizer step runs in float32 and the weights (and the optimizer's bfloat16 state) go
    back into bfloat16 rounded at random, exact on average (OneTrainer's stochastic rounding), so updates smaller than
    half a weight's bfloat16 step (1/512 to 1/256 of the weight) still add up; rounded to nearest they vanish.
    Unset: on with `full_bf16`; false: round to nearest, as kohya sd-scripts does. Costs float32 copies of 16.8
    million trained values at a time during the optimizer step (of all of them with Prodigy and schedule-free AdamW,
    which size their steps from every tensor at once)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    seed: int = 42
    """Seed of every random choice of the run (data order, noise, timesteps, initial adapter weights)."""
    min_snr_gamma: float = 0.0
    """Min-SNR loss weighting gamma (Hang et al. 2023, arXiv:2303.09556); 5 is typical, 0 turns it off."""
    noise_offset: float = 0.0
    """Offset noise strength (Guttenberg 2023): helps very dark and very bright images; 0.05-0.1 typical."""
    noise_offset_random_strength: bool = False
    """Draw each batch's offset-noise strength uniformly from 0 to `noise_offset` (kohya's
    `noise_offset_random_strength`), so both subtle and strong brightness shifts are learned."""
    adaptive_noise_scale: float = 0.0
    """Add this multiple of each latent channel's absolute mean to `noise_offset` (kohya's `adaptive_noise_scale`;
    about a tenth of `noise_offset` is usual, 0 is off): very dark or bright photos get more offset."""
    multires_noise_iterations: int = 0
    """Multi-resolution (pyramid) noise: add this many coarser noise levels (kohya's name; 6-10 typical, 0 is off), so
    the model also learns large areas: overall colour, composition. Not together with `noise_offset`."""
    multires_noise_discount: float = 0.3
    """Weight of each coarser level of multi-resolution noise relative to the one before it (0.1-0.3 typical)."""
    ip_noise_gamma: float = 0.0
    """Input perturbation (Ning et al. 2023, arXiv:2301.11706): the latents are noised with slightly more noise
    than the target says, as a sampler's own errors do at generation time; 0.1 typical, 0 is off."""
    ip_noise_gamma_random_strength: bool = False
    """Draw each batch's input-perturbation strength uniformly from 0 to `ip_noise_gamma` (kohya's
    `ip_noise_gamma_random_strength`)."""
    debiased_estimation: bool = False
    """Weight the loss by 1 / sqrt(SNR) (Yu et al. 2024, arXiv:2310.08442; kohya's `debiased_estimation_loss`):
    noisy steps, where shape and layout are decided, count more than almost clean ones."""
    scale_v_pred_loss_like_noise_pred: bool = False
    """v-prediction bases: weight the loss by SNR / (SNR + 1) (kohya's `scale_v_pred_loss_like_noise_pred`), so
    an error counts as much as in an epsilon-prediction run; refused for epsilon-prediction bases."""
    v_pred_like_loss: float = 0.0
    """Epsilon-prediction bases: add this share of the loss a v-prediction target would give for the same error
    (kohya's `v_pred_like_loss`; the weight is 1 + share x (SNR + 1) / SNR), so noisy steps count more; 0 is off,
    0.1-0.5 is usual; refused for v-prediction bases."""
    cache_latents: bool = True
    """Encode every image with the VAE once, cached under the dataset's `.cache/`, instead of every step."""
    log_every_steps: int = 1
    """Write a `metrics.jsonl` line (and a TensorBoard point) every this many optimizer steps."""
    save_every_steps: int = 500
    """Write a resumable checkpoint every this many steps (and always at the end); 0 writes only the final one."""
    save_every_epochs: int = 0
    """Also write a checkpoint at the end of every this many epochs (kohya's `save_every_n_epochs`); 0 is off."""
    save_every_minutes: float = 0.0
    """Also write a resumable checkpoint whenever this many minutes have passed since the last one (a backup for a
    run that may be cut off, on Colab or a spot instance; OneTrainer's backup interval): a checkpoint only, with no
    intermediate adapter and no samples. 0 is off."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the adapter weights with this decay (0.999 typical) and export it
    instead of the raw weights; 0 turns it off."""
    loss_type: LossType = "l2"
    """`l2` (mean squared error), `l1` (mean absolute error), `huber` or `smooth_l1` (less swayed by outlier pixels;
    see `huber_c`)."""
    huber_c: float = 0.1
    """Threshold of the huber / smooth_l1 losses."""
    huber_schedule: HuberSchedule = "constant"
    """How the huber / smooth_l1 threshold follows the timestep (kohya's `huber_schedule`, whose default is `snr`):
    `constant` is `huber_c x huber_scale`; `exponential` falls from `huber_scale` at t = 0 to
    `huber_c x huber_scale` at the last step; `snr` is (1 - huber_c) / (1 + sigma)^2 + huber_c, near squared error
    on almost clean steps and robust on noisy ones (Khrapov et al. 2024)."""
    huber_scale: float = 1.0
    """Multiplies the `constant` and `exponential` huber thresholds (kohya's `huber_scale`; `snr` ignores it, as
    kohya's does)."""
    min_timestep: int = 0
    """Lowest training timestep (inclusive)."""
    max_timestep: int | None = None
    """Highest training timestep (exclusive); default the scheduler's number of timesteps (1000)."""
    timestep_bias: TimestepBias = "none"
    """Draw some training timesteps more often (diffusers' and SimpleTuner's `timestep_bias_strategy`): `later` the
    noisiest `timestep_bias_portion` of the schedule, where composition and layout are learned; `earlier` the least
    noisy, where fine detail and texture are; `range` those from `timestep_bias_begin` to `timestep_bias_end`.
    `none` draws every timestep alike."""
    timestep_bias_multiplier: float = 2.0
    """How many times as often the biased timesteps are drawn as the others; 0 never draws them, below 1 draws them
    less often (diffusers' default, 1, would change nothing)."""
    timestep_bias_portion: float = 0.25
    """`earlier` / `later`: the share of the schedule's timesteps that is biased."""
    timestep_bias_begin: int = 0
    """`range`: the first biased timestep."""
    timestep_bias_end: int = 1000
    """`range`: the timestep after the last biased one (exclusive)."""
    allow_tf32: bool = True
    """On Ampere and later NVIDIA GPUs, run float32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa
    inputs, float32 accumulation; the frozen weights and LoRA stay float32). Ignored elsewhere."""
    compile: bool = False
    """`torch.compile` the U-Net: the first step compiles (its time is logged), later steps run faster on a GPU.
    Needs a C++ compiler on a CPU."""
    down_lr_weight: list[float] | str | None = None
    """Block-wise learning rates (kohya's names): one factor per U-Net input block, IN00 to IN11 for SD 1.x/2.x (12),
    IN00 to IN08 for SDXL (9); each block's adapters learn at `unet_lr` times its factor, and a block at 0 gets no
    adapters at all. Or one of kohya's curves from the first block to the last: "sine" (0 up to 1), "cosine" (1
    down to 0), "linear", "reverse_linear" or "zeros", with "+0.5" added to every factor if given. Unset: 1
    everywhere."""
    mid_lr_weight: float | list[float] | None = None
    """Block-wise learning rate of the U-Net's middle block (M00), as `down_lr_weight`; for SDXL also kohya's three
    values, one per part of the middle block (ResNet, attention, ResNet)."""
    up_lr_weight: list[float] | str | None = None
    """Block-wise learning rates of the U-Net's output blocks, OUT00 to OUT11 (SDXL: OUT00 to OUT08), as
    `down_lr_weight`."""
    block_lr_zero_threshold: float = 0.0
    """Block-wise factors at or below this become 0, so those blocks get no adapter (kohya's
    `block_lr_zero_threshold` network arg), e.g. 0.1 with a curve."""
    scale_weight_norms: float | None = None
    """Max-norm regularisation (kohya's name): after each step, any LoRA module whose update (scale included) has a
    Frobenius norm above this is scaled back to it, which keeps single layers from running away and the adapter
    gentler at strength 1; 1.0 is the usual choice, unset is off. LoRA only. `metrics.jsonl` logs `keys_scaled`
    and `max_key_norm`."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the up-projections (`lora_B`) learn at this many times the
    learning rate (16 is the paper's choice); unset is off. LoRA only: kohya sd-scripts and LyCORIS apply the ratio
    to `lora_up` weights, which LoKr/LoHa do not have."""
    loraplus_unet_lr_ratio: float | None = None
    """LoRA+ ratio of the U-Net's adapter alone, in place of `loraplus_lr_ratio` there (kohya's
    `loraplus_unet_lr_ratio`)."""
    loraplus_text_encoder_lr_ratio: float | None = None
    """LoRA+ ratio of the text encoders' adapters alone, in place of `loraplus_lr_ratio` there (kohya's
    `loraplus_text_encoder_lr_ratio`)."""

    @property
    def rounds_stochastically(self) -> bool:
        """Whether optimizer steps round the bfloat16 weights stochastically: full_bf16's default."""
        return self.full_bf16 and self.stochastic_rounding is not False


@dataclass(frozen=True)
class PriorSection:
    class_dir: str
    """Folder of class images (e.g. photos of other people when training one person): prior preservation."""
    class_prompt: str | list[str]
    """Caption of the class images, e.g. "a photo of a person"; a list gives rendered class images these prompts in
    turn (each image keeps its prompt in a .txt beside it)."""
    num_class_images: int = 100
    """How many class images to use; the folder must hold at least this many."""
    prior_loss_weight: float = 1.0
    """Weight of the class images' loss relative to the instance images'."""


@dataclass(frozen=True)
class SampleSection:
    prompts: list[str] = field(default_factory=list)
    """Prompts rendered into `samples/step-NNNNNN.png` during training (one grid per save). kohya's inline options
    work: `"ohwx man at the beach --n blurry --w 512 --h 768 --d 7 --s 28 --l 6"` sets that image's negative
    prompt, size, seed, steps and guidance."""
    every_steps: int = 0
    """Render samples every this many steps; 0 (with `every_epochs` 0 too) means at every checkpoint."""
    every_epochs: int = 0
    """Also render samples at the end of every this many epochs (kohya's `sample_every_n_epochs`); 0 is off."""
    at_first: bool = False
    """Also render the samples before the first step, into `samples/step-000000.png` (kohya's `sample_at_first`):
    what the base draws for your prompts, to compare the later grids with."""
    sampler: Sampler = "euler"
    """The sampler of the samples and of rendered class images (kohya's `sample_sampler`): `euler`, `euler_a`,
    `dpmpp_2m` (DPM++ 2M) or `ddim`."""
    seed: int = 0
    """Seed of the first sample image; image i uses seed + i."""
    steps: int = 20
    """Denoising steps per sample."""
    guidance: float = 7.0
    """Classifier-free guidance scale."""
    negative_prompt: str = ""
    """Negative prompt of every sample."""


@dataclass(frozen=True)
class ValidationSection:
    folder: str | None = None
    """A held-out dataset folder (same layout as `data.folder`) whose denoising loss is logged as `val_loss`."""
    split: float = 0.0
    """Instead of `folder`: hold out this share of `data.folder`'s images (kohya's `validation_split`, e.g. 0.1),
    the same ones on every run of the same `seed`; they are left out of training."""
    seed: int | None = None
    """Which images `split` holds out (kohya's `validation_seed`); unset: `train.seed`."""
    every_steps: int = 100
    """Compute the validation loss every this many steps (and at the end); 0: only at the end and at `every_epochs`."""
    every_epochs: int = 0
    """Also compute it at the end of every this many epochs (kohya's `validate_every_n_epochs`); 0 is off."""
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """The fixed timesteps the validation loss is averaged over; the noise is fixed too."""


@dataclass(frozen=True)
class OutputSection:
    folder: str = "output"
    """Parent folder of run folders."""
    name: str = "lora"
    """Run name: the run folder is `<folder>/<name>/`, the adapter `<name>.safetensors`."""
    save_dtype: SaveDtype = "float16"
    """dtype of the exported adapter files."""
    title: str = ""
    """The adapter's title in its metadata (`modelspec.title`, what model sites and UIs show); empty: `name`."""
    author: str = ""
    """Author in the metadata (`modelspec.author`; kohya's `metadata_author`)."""
    description: str = ""
    """Description in the metadata (`modelspec.description`)."""
    license: str = ""
    """License in the metadata (`modelspec.license`), e.g. "CreativeML Open RAIL-M"."""
    tags: list[str] = field(default_factory=list)
    """Tags in the metadata (`modelspec.tags`, comma-separated), e.g. ["character", "anime"]."""
    comment: str = ""
    """A free comment stored as `ss_training_comment` (kohya's `training_comment`), e.g. how the photos were chosen."""
    intermediate_adapters: bool = True
    """With every checkpoint before the last, also write the adapter as it is then, to compare them and pick one:
    `<name>-step00000500.safetensors`, or `<name>-000004.safetensors` at the end of epoch 4 (kohya's names), in
    the final file's layout (kohya; diffusers for DoRA). Pruning checkpoints keeps them."""
    log_with: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    """Where the curves of `metrics.jsonl` and the sample grids also go (kohya's `log_with`): `tensorboard` (the run
    folder's `tensorboard/`, when the tensorboard package is installed) and `wandb` (Weights & Biases: `pip install
    wandb`, then `wandb login` or WANDB_API_KEY; with WANDB_MODE=offline it logs into the run folder's `wandb/` for a
    later `wandb sync`). [] logs to `metrics.jsonl` alone."""
    wandb_project: str = "lorakit"
    """The Weights & Biases project the run goes to with `log_with = ["wandb"]` (kohya's `log_tracker_name`); the
    run is named `name` and its config is the resolved recipe."""


@dataclass(frozen=True)
class EmbeddingSection:
    token: str
    """Pivotal tuning (diffusers' advanced DreamBooth script, OneTrainer's additional embeddings): this word of the
    captions, usually `data.trigger`, becomes `vectors` new learned tokens trained beside the LoRA (textual
    inversion), so the subject is not squeezed into what an existing word means. The run also writes
    `embeddings/<token>.safetensors`, which the webuis load by its name and diffusers with `load_textual_inversion`;
    use it together with the adapter."""
    vectors: int = 2
    """How many token vectors the word becomes (1-16; 2 is diffusers' default)."""
    init_words: str = ""
    """Words whose token embeddings start the vectors (cycled), e.g. "man"; empty: random, with the spread of the
    embedding table (as diffusers starts them)."""
    lr: float = 3e-4
    """Learning rate of the token vectors."""
    train_until: float = 1.0
    """The share of the run's steps during which the vectors train; after it they are frozen and only the LoRA
    goes on (diffusers' `train_text_encoder_ti_frac`, whose default is 0.5)."""
    only: bool = False
    """Train the vectors alone, with no LoRA (textual inversion, as kohya's `train_textual_inversion.py` and
    OneTrainer's embedding training do): the U-Net and the text encoders stay frozen, and the run writes
    `embeddings/<token>.safetensors` only. `[lora]` keys and the adapters' learning rates are then refused."""


@dataclass(frozen=True)
class PreservationSection:
    class_word: str
    """Differential output preservation (ai-toolkit's `diff_output_preservation`): every caption is also trained
    with `data.trigger` replaced by this word ("ohwx person" becomes "person"), towards what the base model without
    the adapter predicts for it on the same noisy image. The adapter then changes what the trigger draws and leaves
    the class word as the base draws it, with no class images. Each step runs the U-Net on twice the batch, plus
    once without the adapter."""
    weight: float = 1.0
    """How much the preservation loss counts beside the denoising loss (ai-toolkit's multiplier); 0 turns it off
    (what `lorakit plan --fit` sets when the doubled batch does not fit)."""


@dataclass(frozen=True)
class SliderSection:
    positive: str | list[str] = ""
    """A concept slider (Gandikota et al. 2023, arXiv:2311.12092; ai-toolkit's slider training), learned from prompts
    alone, with no images: at strength +1 the adapter moves what `target_class` draws towards this prompt and away
    from `negative`, at -1 the other way, and at 0 it draws what the base does, so `--lora FILE:-2` to `:2` is a
    slider. Write the extreme, e.g. "an extremely detailed, intricate photo". One of `positive` and `negative` may be
    empty (the empty prompt is then that end). A list, with `negative` and `target_class` as lists of the same length
    or single prompts, gives the slider several targets (ai-toolkit's list of targets), one drawn for each latent:
    e.g. target_class = ["man", "woman"], positive = ["an old man", "an old woman"], negative = ["a young man", "a
    young woman"] moves each class along its own words."""
    negative: str | list[str] = ""
    """The other end of the slider, e.g. "a blurry, plain photo with no detail"; a list: one per target."""
    target_class: str | list[str] = ""
    """The prompt the slider is trained on, e.g. "person" for a slider of people only; empty: every picture; a list:
    one per target."""
    guidance: float = 1.0
    """How far strength 1 moves the prediction along positive minus negative (the paper's eta; ai-toolkit uses 1)."""
    weight: float | list[float] = 1.0
    """How much a target's latents count in the loss (ai-toolkit's target `weight`): one number, or one per target of
    the lists above, e.g. [1.0, 0.5] to move the second class half as hard."""
    denoise_steps: int = 40
    """Each step's noisy latent is pure noise denoised by the frozen base for a random 1 to `denoise_steps` - 2 of
    this many steps under `target_class` (ai-toolkit's `max_denoising_steps`), so the slider learns on the kind of
    picture the base makes; that costs about (`denoise_steps` - 1) / 2 forward passes of twice the batch per step."""
    shuffle: bool = False
    """Shuffle the comma-separated parts of `positive`, `negative` and `target_class` for each latent of each step
    (ai-toolkit's `shuffle`), so the slider learns the concepts rather than one wording of them; the text encoders
    then encode every step instead of once."""

    @property
    def targets(self) -> list[tuple[str, str, str]]:
        """(target_class, positive, negative) of each target: the lists side by side, a single prompt in every one."""
        keys = (self.target_class, self.positive, self.negative)
        count = max((len(value) for value in keys if isinstance(value, list)), default=1)
        return [tuple(v[i] if isinstance(v, list) else v for v in keys) for i in range(count)]  # type: ignore[misc]

    @property
    def weights(self) -> list[float]:
        """`weight` for each target."""
        count = len(self.targets)
        return list(self.weight) if isinstance(self.weight, list) else [self.weight] * count


@dataclass(frozen=True)
class Recipe:
    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)
    prior: PriorSection | None = None
    sample: SampleSection = field(default_factory=SampleSection)
    validation: ValidationSection | None = None
    embedding: EmbeddingSection | None = None
    preservation: PreservationSection | None = None
    slider: SliderSection | None = None
    source: str = "<recipe>"
    """Where the recipe was read from (for messages)."""

    @property
    def preserving(self) -> bool:
        """Whether [preservation] is on: the section is there, with a weight above 0."""
        return self.preservation is not None and self.preservation.weight > 0

    @property
    def text_varies(self) -> bool:
        """Whether the text the run encodes changes from step to step (a caption's tags, a [slider]'s shuffled
        prompts), so its text-encoder output cannot be computed once and cached."""
        return self.data.tags_vary or (self.slider is not None and self.slider.shuffle)

    @property
    def strengths_vary(self) -> bool:
        """Whether the adapter trains at another strength than 1 on some images (a [slider], or
        `data.adapter_strength`), so each sample of a batch gets its own (slider.SampleStrengths)."""
        return self.slider is not None or self.data.strengths_vary

    def trains_text_encoder(self, sdxl: bool) -> bool:
        """`lora.train_text_encoder`, or its default for the base: true for SD 1.x and 2.x, false for SDXL, for a
        `[slider]` (what moves is how the U-Net draws the concept, not how it is described) and with
        `embedding.only` (no LoRA at all)."""
        if self.embedding is not None and self.embedding.only:
            return False
        if self.lora.train_text_encoder is not None:
            return self.lora.train_text_encoder
        return not sdxl and self.slider is None


SECTIONS: dict[str, type] = {
    name: next(a for a in typing.get_args(tp) if a is not type(None)) if typing.get_args(tp) else tp
    for name, tp in typing.get_type_hints(Recipe).items()
    if name != "source"
}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs
