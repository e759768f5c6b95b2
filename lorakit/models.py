"""Load the frozen base: U-Net, VAE, text encoder(s), tokenizer(s) and the training noise scheduler.

Components are kept generic over one (SD 1.x/2.x) or two (SDXL) text encoders so that the
conditioning and the export code never special-case a family by name more than they must.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .base_files import load_single_file
from .embedding import expand
from .errors import ModelError, first_line
from .formats.read import tensors_dtype
from .prompt_syntax import weighted_tokens

LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


@dataclass
class BaseModel:
    """The frozen components of a Stable Diffusion base model."""

    source: str
    family: str  # "sd1", "sd2" or "sdxl"
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    prediction_type: str
    placeholders: dict[str, str] = field(default_factory=dict)  # [embedding]: word -> its new tokens, spelled out

    @property
    def text_encoder_names(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]

    @property
    def adaptable(self) -> dict[str, Any]:
        """The models adapters change, by the component names adapter files use: the U-Net and text encoders."""
        return {"unet": self.unet, **dict(zip(self.text_encoder_names, self.text_encoders, strict=True))}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this for the U-Net's down/up-sampling to line up."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)


def is_local(base: str) -> bool:
    """A base that exists on disk or is spelled like a path is local; anything else is a hub id."""
    return base.startswith(LOCAL_PREFIXES) or Path(base).expanduser().exists()


def resolve_base(base: str) -> str:
    """An absolute path for a local base (a diffusers folder or a single file), the id itself for the hub."""
    if not is_local(base):
        return base
    path = Path(base).expanduser().resolve()
    if is_single_file(base) and path.is_file():
        return str(path)
    if not path.exists():
        raise ModelError(
            f"model.base: {base} does not exist; give a diffusers model folder (with model_index.json) "
            "or a Hugging Face hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"model.base: {base} is not a diffusers model folder (no model_index.json); "
            "give the folder that holds unet/, vae/, text_encoder/ and model_index.json"
        )
    return str(path)


def model_index(base: str, revision: str | None) -> dict:
    if is_local(base):
        return json.loads((Path(base) / "model_index.json").read_text(encoding="utf-8"))

    try:
        return json.loads(Path(hf_hub_download(base, "model_index.json", revision=revision)).read_text("utf-8"))
    except Exception as err:  # offline miss, unknown repo, no access: all mean "cannot use this base"
        from huggingface_hub.constants import HF_HUB_OFFLINE

        why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if HF_HUB_OFFLINE else type(err).__name__
        raise ModelError(
            f"model.base: {base!r} is neither a local folder nor a hub model available here ({why}); "
            "check the id, log in, or download it and give its folder"
        ) from None


def detect_family(model_index: dict, unet_config: dict) -> str:
    """ "sdxl" (two text encoders), "sd2" (1024-wide cross-attention, OpenCLIP-H) or "sd1"."""
    if "text_encoder_2" in model_index:
        return "sdxl"
    return "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd1"


def _load_vae(vae: str, kwargs: dict) -> Any:

    if is_local(vae) and not (Path(vae).expanduser() / "config.json").is_file():
        raise ModelError(
            f"model.vae: {vae} is not a diffusers VAE folder (no config.json); give an AutoencoderKL "
            "folder or a hub id such as stabilityai/sd-vae-ft-mse"
        )
    try:
        return AutoencoderKL.from_pretrained(str(Path(vae).expanduser()) if is_local(vae) else vae, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.vae: cannot load {vae}: {first_line(err)}") from None


def load_base(
    base: str,
    *,
    prediction_type: str | None = None,
    revision: str | None = None,
    vae: str | None = None,
    weight_dtype: str = "float32",
    config: str | None = None,
    zero_terminal_snr: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> BaseModel:
    """Load every component of `base` (a diffusers folder, hub id or single-file checkpoint), frozen, in eval mode.

    `vae` replaces the base's VAE; `weight_dtype` is the dtype of the frozen U-Net and text
    encoder weights (the VAE stays float32: SD VAEs overflow in fp16); `config` is needed for a
    single-file SD 1.x/2.x base (see `load_pipeline`); `log` hears what a single file made us assume.
    """

    if is_single_file(base):
        pipe = load_single_file(base, config, log, weight_dtype)
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        source = str(Path(base).expanduser().resolve())
        family = detect_family({"text_encoder_2": 1} if sdxl else {}, dict(pipe.unet.config))
        unet, text_encoders, tokenizers = pipe.unet, [pipe.text_encoder], [pipe.tokenizer]
        if sdxl:
            text_encoders.append(pipe.text_encoder_2)
            tokenizers.append(pipe.tokenizer_2)
        vae_model = _load_vae(vae, {}) if vae else pipe.vae
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        source = resolve_base(base)
        try:
            family, unet, vae_model, text_encoders, tokenizers, scheduler = _load_folder(
                source, revision, vae, weight_dtype
            )
        except (OSError, ValueError) as err:
            raise ModelError(f"model.base: cannot load {base}: {first_line(err)}") from None
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    if zero_terminal_snr:  # the betas are recomputed from the config, so rebuild the scheduler
        scheduler = DDPMScheduler.from_config(
            scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
        )
    for module in (unet, vae_model, *text_encoders):
        module.requires_grad_(False)
        module.eval()
    for module in (unet, *text_encoders):  # a folder's arrive in weight_dtype, a float32 single file's do not
        if module.dtype != getattr(torch, weight_dtype):
            module.to(getattr(torch, weight_dtype))
    return BaseModel(
        source=source,
        family=family,
        unet=unet,
        vae=vae_model,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=scheduler,
        prediction_type=scheduler.config.prediction_type,
    )


def _load_folder(source: str, revision: str | None, vae: str | None, weight_dtype: str = "float32") -> tuple:
    """(family, unet, vae, text encoders, tokenizers, scheduler) of a diffusers folder or hub id, the U-Net and text
    encoders read in `weight_dtype`. Files already in it stay mapped from disk; read as float32 and cast after, a
    float16 SD 1.5 folder took 3.9 GB of process memory (benchmarks/load_memory.py)."""
    index = model_index(source, revision)
    kwargs = {"revision": revision} if not is_local(source) else {}
    dtype = getattr(torch, weight_dtype)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", dtype=dtype, **kwargs)
    family = detect_family(index, dict(unet.config))
    vae_model = _load_vae(vae, {}) if vae else AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
    encoder = {"dtype": dtype, **kwargs}
    text_encoders = [CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **encoder)]
    tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)]
    if family == "sdxl":  # CLIP-L, then OpenCLIP bigG with its pooled projection
        second = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **encoder)
        text_encoders.append(second)
        tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs))
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    return family, unet, vae_model, text_encoders, tokenizers, scheduler


def _final_norm(text_encoder: Any) -> Any:
    # transformers 5 dropped the `text_model` level from CLIPTextModel; CLIPTextModelWithProjection keeps it.
    # A DistributedDataParallel wrapper (several processes) holds the model as `.module`.
    model = getattr(text_encoder, "module", text_encoder)
    return getattr(model, "text_model", model).final_layer_norm


def encode_chunk(text_encoder: Any, ids: Any, clip_skip: int) -> Any:
    """An SD 1.x/2.x text encoder's output for one context of token ids: the last layer's, or with `clip_skip` N
    the N-th last layer's with the final layer norm applied (as diffusers' pipelines and kohya take it)."""
    if clip_skip == 1:
        return text_encoder(ids, return_dict=False)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return _final_norm(text_encoder)(hidden)


def encode_prompts(base: BaseModel, input_ids: list[Any], clip_skip: int = 1) -> dict[str, Any]:
    """U-Net conditioning for token ids (one tensor per text encoder): the `unet(...)` keyword arguments (SDXL's
    pooled text embedding under `pooled`, to go with the size conditioning).

    Ids longer than 77 tokens (`data.max_token_length` 150 or 225) are encoded in 75-token chunks, each wrapped
    in its own start and end tokens (`chunk_ids`), and the chunk outputs joined (the first start, every chunk's
    body, the last chunk's end), as kohya's max_token_length does. `clip_skip` N takes the N-th last layer, final
    layer norm applied.
    """

    if base.family == "sdxl":
        return _encode_sdxl(base, input_ids)
    ids, tokenizer, text_encoder = input_ids[0], base.tokenizers[0], base.text_encoders[0]
    if ids.shape[1] <= 77:
        return {"encoder_hidden_states": encode_chunk(text_encoder, ids, clip_skip)}
    outputs = [encode_chunk(text_encoder, chunk, clip_skip) for chunk in chunk_ids(tokenizer, ids)]
    return {"encoder_hidden_states": _joined(outputs)}


CHUNK = 75  # tokens of a caption in one CLIP context, between its start and end tokens


def chunk_ids(tokenizer: Any, ids: Any) -> list[Any]:
    """A batch of long token rows (start, 150 or 225 tokens, end or padding) as 77-token chunks, the way kohya cuts
    them: the start token, 75 tokens, and the row's last token. Where padding is not the end token (SD 2.x, SDXL's
    second tokenizer), a chunk whose text runs to its end gets the end token, and an empty chunk starts with it."""
    chunks = []
    for start in range(1, ids.shape[1] - 1, CHUNK):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + CHUNK], ids[:, -1:]], dim=1)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        if pad != eos:
            runs_on = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[runs_on, -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return chunks


def _joined(outputs: list[Any]) -> Any:
    """Chunk outputs as one sequence: the first start token, every chunk's body, the last chunk's end."""
    return torch.cat([outputs[0][:, :1], *(out[:, 1:-1] for out in outputs), outputs[-1][:, -1:]], dim=1)


def _encode_sdxl(base: BaseModel, input_ids: list[Any]) -> dict[str, Any]:
    """SDXL: the penultimate hidden states of CLIP-L and of OpenCLIP bigG, side by side, and bigG's pooled
    projection (`pooled`, which the U-Net gets as `added_cond_kwargs["text_embeds"]`), as diffusers' pipeline
    encodes a prompt. Long captions are encoded in chunks as `encode_prompts` says; the pooled projection is the
    first chunk's, as kohya takes it."""
    hidden = []
    for tokenizer, text_encoder, ids in zip(base.tokenizers, base.text_encoders, input_ids, strict=True):
        chunks = [ids] if ids.shape[1] <= 77 else chunk_ids(tokenizer, ids)
        outputs = [text_encoder(chunk, output_hidden_states=True) for chunk in chunks]
        states = [output.hidden_states[-2] for output in outputs]
        hidden.append(states[0] if len(states) == 1 else _joined(states))
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "pooled": outputs[0].text_embeds}


def tokenize(base: BaseModel, captions: list[str], max_token_length: int = 75) -> list[Any]:
    """Token ids of `captions` for each tokenizer, padded to its context (77 for SD), or to `max_token_length` + start
    and end tokens when longer captions are asked for."""
    lengths = [tok.model_max_length if max_token_length == 75 else max_token_length + 2 for tok in base.tokenizers]
    captions = [expand(caption, base.placeholders) for caption in captions]
    return [
        tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        for tok, length in zip(base.tokenizers, lengths, strict=True)
    ]


def tokenize_weighted(base: BaseModel, captions: list[str], max_token_length: int = 75) -> tuple[list[Any], Any]:
    """kohya's weighted captions: the token ids `tokenize` gives for the captions' text without the webui's brackets
    and weights (`(red hair:1.2)` reads `red hair`), and each token's weight ([B, L]; 1 at the start, the end and
    the padding), for `apply_token_weights`. A `BREAK` means nothing in a caption and is left out."""
    lengths = [tok.model_max_length if max_token_length == 75 else max_token_length + 2 for tok in base.tokenizers]
    rows: list[list[list[int]]] = [[] for _ in base.tokenizers]
    weights: list[list[float]] = []
    for caption in captions:
        for index, (tok, length) in enumerate(zip(base.tokenizers, lengths, strict=True)):
            pairs = [(t, w) for t, w in weighted_tokens(tok, expand(caption, base.placeholders)) if t is not None]
            ids, factors = [t for t, _ in pairs], [w for _, w in pairs]
            body = length - 2
            pad = body - len(ids[:body])
            rows[index].append([tok.bos_token_id, *ids[:body], tok.eos_token_id] + [tok.pad_token_id] * pad)
            if index == 0:  # the tokenizers split text alike (they differ in padding only)
                weights.append([1.0, *factors[:body], 1.0] + [1.0] * pad)
    return [torch.tensor(r) for r in rows], torch.tensor(weights)


def apply_token_weights(conditioning: dict[str, Any], weights: Any) -> dict[str, Any]:
    """The text conditioning with each token's hidden state multiplied by its weight, as kohya's weighted captions
    do (without the webui's restoring of the mean); SDXL's pooled embedding stays as it is."""
    states = conditioning["encoder_hidden_states"]
    factors = weights.to(states.device, states.dtype)[:, :, None]
    return {**conditioning, "encoder_hidden_states": states * factors}


def token_count(base: BaseModel, caption: str) -> int:
    """Length of `caption` in tokens of the (first) tokenizer, without start and end tokens."""
    return len(base.tokenizers[0](expand(caption, base.placeholders), truncation=False).input_ids) - 2


_WEIGHTS = re.compile(r"diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors")  # not a variant (.fp16.) file


def base_dtype(base: str, revision: str | None = None) -> str | None:
    """The dtype a base stores its weights in (its U-Net's, for a diffusers folder), from a safetensors header: a
    single file, a local folder, or a hub id whose U-Net is in the Hugging Face cache; None when unknown here."""
    if is_single_file(base):
        return tensors_dtype(Path(base).expanduser())
    if is_local(base):
        unet = Path(base).expanduser() / "unet"
        files = sorted(p for p in unet.glob("*.safetensors") if _WEIGHTS.fullmatch(p.name)) if unet.is_dir() else []
        return tensors_dtype(files[0]) if files else None
    cached = try_to_load_from_cache(base, "unet/diffusion_pytorch_model.safetensors", revision=revision)
    if not isinstance(cached, str):  # a U-Net sharded in several files: its first shard, named by the index
        index = try_to_load_from_cache(base, "unet/diffusion_pytorch_model.safetensors.index.json", revision=revision)
        shards = _shard_names(Path(index)) if isinstance(index, str) else []
        cached = try_to_load_from_cache(base, f"unet/{shards[0]}", revision=revision) if shards else None
    return tensors_dtype(cached) if isinstance(cached, str) else None


def _shard_names(index: Path) -> list[str]:
    """The files a sharded checkpoint's `.index.json` maps its tensors to; none when it cannot be read."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return []
    names = weight_map.values() if isinstance(weight_map, dict) else []
    return sorted({name for name in names if isinstance(name, str)})


def is_single_file(base: str) -> bool:
    return Path(base).suffix.lower() in (".safetensors", ".ckpt") and is_local(base)


def load_pipeline(
    base: str,
    *,
    config: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    log: Callable[[str], None] = lambda _: None,
    as_options: bool = False,
    base_option: str = "--base",
) -> Any:
    """A StableDiffusionPipeline (SDXL's for SDXL) from a diffusers folder, a hub id, or a single-file
    `.safetensors` checkpoint (see `base_files`: SD 1.x/2.x files need `config`, SDXL files may use it), every
    component read in `dtype`: a half-precision render never holds the float32 weights (14 GB for SDXL), and
    casting each weight once as it is read gives the very weights a float32 pipeline cast afterwards would hold.
    `as_options`: the base and config came as a command's options (`base_option`, default --base, and --config), so
    its messages name those.
    """

    if not as_options:
        return _load_pipeline(base, config, revision, dtype, log)
    try:
        return _load_pipeline(base, config, revision, dtype, lambda line: log(in_option_words(line, base_option)))
    except ModelError as err:
        raise ModelError(in_option_words(str(err), base_option)) from None


def in_option_words(text: str, base_option: str = "--base") -> str:
    """A loader's message (which names recipe keys) as said to a command given `base_option` and --config."""
    for key, option in (
        ("set model.config (--config) to a", "give --config a"),
        ("model.base", base_option),
        ("model.config", "--config"),
    ):
        text = text.replace(key, option)
    return text


def _load_pipeline(base: str, config: str | None, revision: str | None, dtype: str, log: Callable[[str], None]) -> Any:
    if is_single_file(base):
        return load_single_file(base, config, log, read_as=None if dtype == "float32" else dtype)
    source = resolve_base(base)
    index = model_index(source, revision)
    kwargs = {} if is_local(source) else {"revision": revision}
    if dtype != "float32":
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        if detect_family(index, {}) == "sdxl":
            return StableDiffusionXLPipeline.from_pretrained(source, **kwargs)
        return StableDiffusionPipeline.from_pretrained(
            source, safety_checker=None, requires_safety_checker=False, **kwargs
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"model.base: cannot load {base}: {first_line(err)}") from None
