"""The AUTOMATIC1111 prompt syntax for rendering: attention weights, `BREAK`, and prompts longer than one CLIP
context, as people write them in the webuis and ComfyUI and expect them to work in `lorakit generate` and in the
samples drawn while training.

- The syntax (`prompt_syntax`): `(word:1.3)`, `(word)`, `[word]`, escapes, and `BREAK`, which starts a new 75-token
  chunk.
- A prompt is encoded in chunks of 75 tokens, each wrapped in its own start and end tokens and padded to the
  context, the chunks' hidden states side by side; the negative prompt gets as many chunks (padded with empty
  ones), since the two must have the same shape.
- Each token's hidden state is multiplied by its weight, and the chunk rescaled so that its mean is what it was
  (the webui's original emphasis); SDXL's pooled embedding comes from the first chunk, unweighted.

A prompt without any of this, within one context, is not encoded here at all: the pipeline encodes it itself, so
plain prompts render exactly as they always have.
"""

from __future__ import annotations

from typing import Any

import torch

from .models import encode_chunk
from .prompt_syntax import has_syntax, weighted_tokens

COMMA_BACKTRACK = 20  # a full chunk whose last comma is at most this many tokens back ends at that comma


def _chunks(pipe: Any, tokenizer: Any, prompt: str) -> list[tuple[list[int], list[float]]]:
    """The prompt's token ids and their weights in chunks of the context less its start and end tokens. As in the
    webui, a chunk that fills up with a comma among its last `COMMA_BACKTRACK` tokens ends after that comma, and
    what followed it starts the next chunk, so a phrase is not cut in two."""
    size = tokenizer.model_max_length - 2
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for token, weight in weighted_tokens(tokenizer, prompt, getattr(pipe, "maybe_convert_prompt", None)):
        if token is None:  # BREAK
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        if len(ids) == size:
            cut = last_comma + 1 if token != comma and 0 <= size - last_comma <= COMMA_BACKTRACK else size
            chunks.append((ids[:cut], weights[:cut]))
            ids, weights, last_comma = ids[cut:], weights[cut:], -1
        if token == comma:
            last_comma = len(ids)
        ids.append(token)
        weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def needs_encoding(pipe: Any, prompt: str, negative: str, clip_skip: int = 1) -> bool:
    """Whether the pipeline cannot encode these prompts as they are meant: the syntax, more tokens than one context
    holds, or clip skip (which diffusers' SD 1.x/2.x pipelines look for where transformers 5 no longer has it)."""
    if clip_skip > 1:
        return True
    for text in (prompt, negative):
        if has_syntax(text) or len(_chunks(pipe, pipe.tokenizer, text)) > 1:
            return True
    return False


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) of each of the pipeline's text encoders: SDXL's CLIP-L first."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _encode(
    pipe: Any, found: list[list[tuple[list[int], list[float]]]], chunks: int, clip_skip: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prompt's hidden states from its chunks per tokenizer (`found`, `_chunks`'), `chunks` chunks long (empty
    ones added at the end), and SDXL's pooled embedding (None for SD 1.x/2.x)."""
    pairs = _encoders(pipe)
    sdxl = len(pairs) == 2
    per_encoder = [own + [([], [])] * (chunks - len(own)) for own in found]
    states, pooled = [], None
    for index in range(chunks):
        hidden, weights = [], None
        for (tokenizer, encoder), own in zip(pairs, per_encoder, strict=True):
            ids, weights = own[index]
            pad = tokenizer.model_max_length - 2 - len(ids)
            row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
            tensor = torch.tensor([row], device=encoder.device)
            if sdxl:  # the layer before the last (minus clip skip), no final norm, as diffusers' SDXL pipeline
                output = encoder(tensor, output_hidden_states=True)
                hidden.append(output.hidden_states[-(clip_skip + 1)])
                if index == 0 and encoder is pipe.text_encoder_2:
                    pooled = output[0]
            else:
                hidden.append(encode_chunk(encoder, tensor, clip_skip))
            weights = [1.0, *weights, 1.0] + [1.0] * pad
        state = torch.cat(hidden, dim=-1)
        if any(w != 1.0 for w in weights):
            scale = torch.tensor(weights, device=state.device, dtype=torch.float32)[None, :, None]
            weighted = state.float() * scale
            state = _mean_restored(state.float(), weighted).to(state.dtype)
        states.append(state)
    return torch.cat(states, dim=1), pooled


def _mean_restored(state: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    """The weighted hidden states rescaled to the mean the unweighted ones had (the webui's original emphasis). A
    chunk whose weighted mean is about zero next to its values (an encoder whose last layer norm centres every
    token, as a freshly made one does; CLIP's learned one does not) keeps its weights unrescaled: the ratio would
    blow up to inf."""
    new = weighted.mean()
    if new.abs() <= 1e-3 * weighted.abs().mean():
        return weighted
    return weighted * (state.mean() / new)


def prompt_embeddings(pipe: Any, prompt: str, negative: str, clip_skip: int = 1) -> dict[str, Any]:
    """The pipeline's `prompt_embeds` / `negative_prompt_embeds` keyword arguments (and SDXL's pooled pair) for a
    prompt and negative prompt in the webui's syntax. `clip_skip` N uses the N-th last layer, as the recipes and
    `--clip-skip` count it."""
    found = {text: [_chunks(pipe, tokenizer, text) for tokenizer, _ in _encoders(pipe)] for text in (prompt, negative)}
    count = max(len(own[0]) for own in found.values())
    with torch.no_grad():
        embeds, pooled = _encode(pipe, found[prompt], count, clip_skip)
        if pooled is not None and not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = _encode(pipe, found[negative], count, clip_skip)
    arguments = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    if pooled is not None:
        arguments |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    return arguments
