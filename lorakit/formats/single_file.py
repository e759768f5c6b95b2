"""Diffusers component state dicts -> single-file (original LDM / SGM, as A1111, ComfyUI and Forge read) names.

The original Stable Diffusion code names U-Net blocks by position (`input_blocks.N.M`, `middle_block`,
`output_blocks`), the VAE by resolution level (`encoder.down.N.block.M`, `decoder.up.N`), and wraps
the CLIP text model as `cond_stage_model.transformer.text_model.`; SD 2.x's OpenCLIP-H text model sits under
`cond_stage_model.model.` in OpenCLIP's own layout (A1111 recognises an SD 2.x file by it, and ComfyUI reads
its text encoder only from there). SDXL's (SGM) checkpoints hold the
same U-Net and VAE names, CLIP-L under `conditioner.embedders.0.transformer.`, and OpenCLIP bigG under
`conditioner.embedders.1.model.` in OpenCLIP's own layout (one `in_proj` for q, k and v, `ln_1`, `c_fc`,
a transposed `text_projection`). The index arithmetic below holds for any number of blocks and
`layers_per_block`, so the tiny test models convert like the full-size ones.
"""

from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = (
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),  # SDXL's text-time embedding
    ("add_embedding.linear_2.", "label_emb.0.2."),
)


def unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for a UNet2DConditionModel config."""
    per = config["layers_per_block"] + 1  # input blocks per level: the resnets and one downsampler
    pairs = list(_UNET_TOP)
    levels = len(config["block_out_channels"])
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(per - 1):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * per + j + 1}.0."))
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * per + j + 1}.1."))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op."))
    for i, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for j in range(per):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0."))
            if attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per + j}.1."))
        if i < levels - 1:
            pairs.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * per + per - 1}.{2 if attention else 1}.")
            )
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]], inner: tuple[tuple[str, str], ...]) -> str:
    for source, target in sorted(pairs, key=lambda p: -len(p[0])):
        if key.startswith(source):
            rest = key[len(source) :]
            if ".resnets." in source or "mid.block_" in target or ".block." in target:
                for a, b in inner:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
            return target + rest
    return key


def unet_to_ldm(state: dict, config: dict) -> dict:
    pairs = unet_prefix_map(config)
    return {UNET_PREFIX + _rename(k, pairs, _RESNET): v for k, v in state.items()}


_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def vae_prefix_map(config: dict) -> list[tuple[str, str]]:
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for i in range(levels):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(layers)]
        pairs += [
            (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}.")
            for j in range(layers + 1)
        ]
        if i < levels - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    return pairs


def vae_to_ldm(state: dict, config: dict) -> dict:
    pairs = vae_prefix_map(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, pairs, _VAE_RESNET)
        if ".mid.attn_1." in new:
            head, rest = new.split(".mid.attn_1.", 1)
            for a, b in _VAE_ATTENTION:
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
            new = f"{head}.mid.attn_1.{rest}"
            if value.ndim == 2:  # the LDM VAE attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def text_encoder_to_ldm(state: dict, prefix: str = TEXT_PREFIX) -> dict:
    """A transformers CLIPTextModel under `prefix` + `text_model.` (transformers 5 drops that level)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


SDXL_CLIP_L_PREFIX, SDXL_BIGG_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def open_clip_to_ldm(state: dict, prefix: str = SDXL_BIGG_PREFIX) -> dict:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's layout under `prefix`: q, k and v stacked into
    one `in_proj` per layer, the projection stored transposed (OpenCLIP multiplies `x @ text_projection`). SD 2.x's
    CLIPTextModel has no projection (its U-Net reads the penultimate layer's states), and none is written."""
    out = {}
    wrapped = ("text_model.", "text_projection.")  # transformers 5 drops a CLIPTextModel's `text_model.` level
    state = {k if k.startswith(wrapped) else "text_model." + k: v for k, v in state.items()}
    for key, value in state.items():
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif key.startswith("text_model.encoder.layers."):
            index, rest = key[len("text_model.encoder.layers.") :].split(".", 1)
            block = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                kind = rest.rsplit(".", 1)[1]  # weight or bias
                if rest.startswith("self_attn.q_proj."):
                    parts = [state[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
                continue
            for source, target in _OPEN_CLIP_LAYER:
                if rest.startswith(source):
                    rest = target + rest[len(source) :]
                    break
            out[block + rest] = value
        elif not key.endswith("position_ids"):
            raise KeyError(f"{key}: no OpenCLIP name for this text-encoder weight")
    return out


def is_open_clip(text_encoder: Any) -> bool:
    """An OpenCLIP text model (SD 2.x's ViT-H, SDXL's bigG): OpenCLIP uses the exact GELU, OpenAI's CLIP-L
    the quick approximation."""
    return text_encoder.config.hidden_act == "gelu"


# Marker tensors the webuis read from a single file: v-prediction, and a zero-terminal-SNR schedule.
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"


def to_single_file(models: dict[str, Any], *, v_prediction: bool = False, zero_terminal_snr: bool = False) -> dict:
    """All weights of a pipeline's `unet`, `vae`, `text_encoder` (and SDXL's `text_encoder_2`) under their original
    LDM/SGM names, plus the `v_pred` / `ztsnr` markers a v-prediction model's file carries."""
    unet, vae = models["unet"], models["vae"]
    tensors = unet_to_ldm(unet.state_dict(), dict(unet.config))
    tensors.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    if "text_encoder_2" in models:
        tensors.update(text_encoder_to_ldm(models["text_encoder"].state_dict(), SDXL_CLIP_L_PREFIX))
        tensors.update(open_clip_to_ldm(models["text_encoder_2"].state_dict()))
    elif is_open_clip(models["text_encoder"]):
        tensors.update(open_clip_to_ldm(models["text_encoder"].state_dict(), SD2_OPEN_CLIP_PREFIX))
    else:
        tensors.update(text_encoder_to_ldm(models["text_encoder"].state_dict()))
    if v_prediction:
        tensors[V_PRED_KEY] = torch.zeros(0)
        if zero_terminal_snr:
            tensors[ZTSNR_KEY] = torch.zeros(0)
    return {k: v.contiguous() for k, v in tensors.items()}
