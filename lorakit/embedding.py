"""Pivotal tuning: a trigger word becomes new token vectors that train beside the LoRA (textual inversion), as
diffusers' advanced DreamBooth script and OneTrainer's additional embeddings do.

The word (`[embedding] token`, e.g. "ohwx") is written to the tokenizers as `vectors` new tokens (`<ohwx0>`,
`<ohwx1>`, ...) and every caption and prompt spells it that way. Each text encoder reads the new tokens' vectors
from a small parameter of its own (`NewTokens`), so the frozen embedding table is never copied or resized, and
only the new rows get gradients and optimizer state.

The file written is a textual-inversion embedding that the webuis and diffusers load by themselves: for SD 1.x/2.x
`emb_params` (vectors x width), for SDXL `clip_l` and `clip_g`, one per text encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterError, RecipeError, first_line

EMBEDDINGS_FOLDER = "embeddings"  # in a run folder: `<token>.safetensors`, and `<token>-000004...` with saves
EMBEDDING_KEYS = {"sd1": ("emb_params",), "sd2": ("emb_params",), "sdxl": ("clip_l", "clip_g")}


class NewTokens(torch.nn.Module):
    """A text encoder's token embedding with `vectors` learned rows appended after its frozen table: ids from
    `first_id` on read `vectors`, every other id the table."""

    def __init__(self, table: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.table = table
        self.first_id = table.num_embeddings
        self.vectors = torch.nn.Parameter(vectors.to(torch.float32))

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads for the dtype and device of the embeddings
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first_id  # no `.any()` shortcut: on a GPU it would wait for the device every step
        found = self.table(ids.clamp(max=self.first_id - 1))
        learned = self.vectors[(ids - self.first_id).clamp(min=0)].to(found.dtype)
        return torch.where(new[..., None], learned, found)


def placeholder_names(token: str, vectors: int) -> list[str]:
    """The tokens the word is spelled as: `<ohwx0>`, `<ohwx1>`, ..."""
    return [f"<{token}{i}>" for i in range(vectors)]


def expand(text: str, placeholders: dict[str, str]) -> str:
    """`text` with each whole-word occurrence of a placeholder word replaced by its new tokens."""
    for word, spelled in placeholders.items():
        text = re.sub(rf"(?<![\w]){re.escape(word)}(?![\w])", spelled, text)
    return text


def add_new_tokens(
    text_encoder: Any, tokenizer: Any, token: str, vectors: int, init_words: str, generator: torch.Generator
) -> NewTokens:
    """Add the word's new tokens to `tokenizer` and a `NewTokens` embedding to `text_encoder`, initialised from the
    embeddings of `init_words` (cycled), or at random with the table's spread when none are given."""
    table = text_encoder.get_input_embeddings()
    if isinstance(table, NewTokens):
        raise RecipeError("embedding: this text encoder already has new tokens; one [embedding] per run")
    names = placeholder_names(token, vectors)
    taken = [n for n in names if n in tokenizer.get_vocab()]
    if taken:
        raise RecipeError(f"embedding.token: {taken[0]} is already a token of this base's tokenizer; choose another")
    if len(tokenizer) != table.num_embeddings:
        raise RecipeError(
            f"embedding: the tokenizer has {len(tokenizer)} tokens but the text encoder {table.num_embeddings} "
            "embeddings; the base model's tokenizer does not match its text encoder"
        )
    tokenizer.add_tokens(names)
    weight = table.weight.detach().float()
    if init_words.strip():
        ids = tokenizer(init_words, add_special_tokens=False).input_ids
        start = weight[torch.tensor([ids[i % len(ids)] for i in range(vectors)])]
    else:
        start = torch.randn((vectors, weight.shape[1]), generator=generator) * weight.std()
    module = NewTokens(table, start.to(table.weight.device))
    text_encoder.set_input_embeddings(module)
    return module


def embedding_file(vectors: list[torch.Tensor], family: str, token: str, steps: int) -> bytes:
    """The textual-inversion file: one (vectors x width) float32 tensor per text encoder, under the names the webuis
    and diffusers read, and in the metadata the word it stands for and the optimizer steps it trained."""
    from safetensors.torch import save

    keys = EMBEDDING_KEYS[family]
    tensors = {key: v.detach().float().cpu().contiguous() for key, v in zip(keys, vectors, strict=True)}
    metadata = {
        "lorakit_token": token,
        "lorakit_vectors": str(vectors[0].shape[0]),
        "lorakit_architecture": family,
        "lorakit_steps": str(steps),
    }
    return save(tensors, metadata=metadata)


EMBEDDING_WIDTHS = {768: "sd1", 1024: "sd2"}  # one-encoder embeddings: CLIP-L (SD 1.x) or OpenCLIP-H (SD 2.x)


@dataclass
class EmbeddingFile:
    """A textual-inversion file: the word it is called by and its vectors, (count x width) per text encoder."""

    path: Path
    word: str
    vectors: dict[str, torch.Tensor]  # `emb_params` (or the file's one key), or SDXL's `clip_l` and `clip_g`
    metadata: dict[str, str]

    @property
    def family(self) -> str:
        if self.metadata.get("lorakit_architecture") in ("sd1", "sd2", "sdxl"):  # written by a lorakit run
            return self.metadata["lorakit_architecture"]
        if set(self.vectors) == {"clip_l", "clip_g"}:
            return "sdxl"
        return EMBEDDING_WIDTHS.get(next(iter(self.vectors.values())).shape[1], "unknown")


def looks_like_embedding(path: Path) -> bool:
    """Whether a .safetensors file holds a textual-inversion embedding rather than an adapter (its keys)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError):
        return False
    return (
        keys == {"clip_l", "clip_g"} or keys == {"emb_params"} or (len(keys) == 1 and "lora" not in next(iter(keys)))
    )


def read_embedding(path: Path, word: str | None = None) -> EmbeddingFile:
    """A textual-inversion file (a run's, or a webui one: `emb_params`, `clip_l` + `clip_g`, or one tensor), called
    by `word`: by default the word it was trained for (lorakit's metadata), else its file name, as the webuis name
    embeddings. AdapterError, naming the file, for one that is missing or is not an embedding."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise AdapterError(f"{path}: embedding file not found")
    if path.suffix.lower() != ".safetensors":
        raise AdapterError(f"{path}: only .safetensors embeddings are read (a {path.suffix} file is a pickle)")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{path}: not a readable embedding file ({err})") from None
    if set(tensors) != {"clip_l", "clip_g"} and "emb_params" not in tensors and len(tensors) != 1:
        raise AdapterError(f"{path}: holds {sorted(tensors)[:4]}, not emb_params, clip_l + clip_g, or one tensor")
    if set(tensors) != {"clip_l", "clip_g"}:
        tensors = {"emb_params": tensors.get("emb_params", next(iter(tensors.values())))}
    vectors = {k: v.reshape(-1, v.shape[-1]) for k, v in tensors.items()}
    return EmbeddingFile(path, word or metadata.get("lorakit_token") or path.stem, vectors, metadata)


def _pipeline_encoders(pipe: Any, embedding: EmbeddingFile) -> list[tuple[torch.Tensor, Any, Any]]:
    """(vectors, text encoder, tokenizer) for each of the pipeline's text encoders, CLIP-L's first. AdapterError,
    naming the file, for an embedding made for another architecture."""
    path, sdxl = embedding.path, getattr(pipe, "text_encoder_2", None) is not None
    if embedding.family == "sdxl" and not sdxl:
        raise AdapterError(f"{path}: an SDXL embedding (clip_l and clip_g) but the base is SD 1.x/2.x")
    if embedding.family != "sdxl" and sdxl:
        raise AdapterError(f"{path}: an SD 1.x/2.x embedding (one tensor) but the base is SDXL (clip_l and clip_g)")
    encoders = [(pipe.text_encoder, pipe.tokenizer)] + ([(pipe.text_encoder_2, pipe.tokenizer_2)] if sdxl else [])
    ordered = [embedding.vectors[key] for key in EMBEDDING_KEYS["sdxl" if sdxl else "sd1"]]
    for vectors, (encoder, _) in zip(ordered, encoders, strict=True):
        width = encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise AdapterError(
                f"{path}: its vectors are {vectors.shape[1]} wide but this base's text encoder takes {width}; the "
                "embedding is for another architecture"
            )
    return [(vectors, encoder, tokenizer) for vectors, (encoder, tokenizer) in zip(ordered, encoders, strict=True)]


def replace_embedding(pipe: Any, path: Path, word: str) -> None:
    """Put the vectors of `path` in place of those the word `word` was loaded with (another save of the same run's
    embedding), in the rows diffusers gave its tokens (`word`, `word_1`, ...): the pipeline then encodes as if it
    had loaded `path` under that word."""
    embedding = read_embedding(path, word)
    for vectors, encoder, tokenizer in _pipeline_encoders(pipe, embedding):
        names = [word] + [f"{word}_{i}" for i in range(1, vectors.shape[0])]
        ids = tokenizer.convert_tokens_to_ids(names)
        if tokenizer.unk_token_id in ids or f"{word}_{vectors.shape[0]}" in tokenizer.get_vocab():
            raise AdapterError(
                f"{path}: {vectors.shape[0]} vectors, but the word {word!r} was loaded with another count"
            )
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[ids] = vectors.to(table.device, table.dtype)


def load_embedding(pipe: Any, path: Path, word: str | None = None) -> str:
    """A textual-inversion file into a diffusers pipeline, under its word (`read_embedding`); returns the word.
    AdapterError, naming the file, for one made for another architecture."""
    embedding = read_embedding(path, word)
    for vectors, encoder, tokenizer in _pipeline_encoders(pipe, embedding):
        try:
            pipe.load_textual_inversion(vectors, token=embedding.word, text_encoder=encoder, tokenizer=tokenizer)
        except ValueError as err:  # diffusers' refusals: a word already in the vocabulary, or loaded twice
            raise AdapterError(f"{path}: {first_line(err)}; give it another word with FILE:WORD") from None
    return embedding.word
