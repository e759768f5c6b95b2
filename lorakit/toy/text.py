"""A CLIP tokenizer and text encoder built in code: a byte-level BPE vocabulary from a word list, saved as
vocab.json / merges.txt, and a small CLIPTextModel whose bos / eos / pad ids are that vocabulary's special tokens.

The toy world's base model is built from these; the test suite's tiny pipelines (tests/tiny.py) too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Words that get whole-word tokens, so that short captions stay short in tokens.
DEFAULT_WORDS = (
    "a photo of person man woman dog cat red green blue yellow black white hat shirt "
    "smiling standing sitting background studio outdoors portrait painting style object "
    "ohwx sks toy on the with in and"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_clip_vocab(words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary: every byte (bare and word-final), whole-word merges, then bos/eos.

    The special tokens come last, as in the real CLIP vocabulary; their ids are what the text
    encoder's config must name as `bos_token_id` / `eos_token_id` / `pad_token_id`.
    """
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            rule = f"{merged} {symbol}"
            merged += symbol
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def make_clip_tokenizer(words: tuple[str, ...] | list[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """A CLIPTokenizer loaded from a generated vocab.json / merges.txt; returns (tokenizer, vocab)."""

    vocab, merges = build_clip_vocab(words)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length), vocab


def make_text_encoder(
    vocab: dict[str, int],
    hidden: int,
    *,
    layers: int = 2,
    heads: int = 4,
    activation: str = "quick_gelu",
    projection_dim: int | None = None,
):
    """A small CLIPTextModel whose bos / eos / pad ids are the vocabulary's special tokens; with `projection_dim`
    a CLIPTextModelWithProjection (SDXL's second encoder, whose pooled projection conditions the U-Net)."""

    eos = vocab["<|endoftext|>"]
    model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return model_class(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            projection_dim=projection_dim or hidden,
            hidden_act=activation,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
