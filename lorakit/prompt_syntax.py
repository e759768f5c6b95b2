"""AUTOMATIC1111's prompt syntax, parsed: `(word)` multiplies the attention of its tokens by 1.1, `[word]` divides it
by 1.1, `(word:1.3)` sets the factor to 1.3; brackets nest (`((word))` is 1.21), one left open applies to the end of
the text, and `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters. `BREAK` (upper case, a word of its
own) marks the start of a new 75-token chunk. Rendering (`emphasis`) and kohya's weighted captions (`models`) read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

EMPHASIS = 1.1  # what one pair of round brackets multiplies by (square brackets divide)
_SYNTAX = re.compile(
    r"\\[()\[\]\\]"  # an escaped bracket or backslash
    r"|\(|\["  # an opening bracket
    r"|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)"  # ":1.3)" closes a round bracket with its weight
    r"|\)|\]"  # a closing bracket
    r"|[^\\()\[\]:]+|:|\\"  # text, a colon or a lone backslash
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Fragment = tuple[str, float | None]  # (text, weight); weight None marks a BREAK


def parse(prompt: str) -> list[Fragment]:
    """A prompt as (text, weight) fragments in order, neighbours of equal weight joined; `BREAK` as ("", None)."""
    pieces: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        token, weight = match[0], match[1]
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append(["", None])
                if part:
                    pieces.append([part, 1.0])
    for start in round_open:
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)
    joined: list[list[Any]] = []
    for text, weight in pieces:
        if joined and weight is not None and joined[-1][1] == weight:
            joined[-1][0] += text
        else:
            joined.append([text, weight])
    return [(text, weight) for text, weight in joined] or [("", 1.0)]


def weighted_tokens(
    tokenizer: Any, text: str, convert: Callable[[str, Any], str] | None = None
) -> Iterator[tuple[int | None, float]]:
    """The token ids of `text` without its syntax, each with its weight, in order, and a `BREAK` as (None, 1.0).
    Each fragment is tokenized on its own, as the webui does; `convert(fragment, tokenizer)` rewrites it first
    (diffusers' `maybe_convert_prompt`: a multi-vector textual-inversion word into its tokens)."""
    for fragment, weight in parse(text):
        if weight is None:
            yield None, 1.0
            continue
        if convert is not None:
            fragment = convert(fragment, tokenizer)
        for token in tokenizer(fragment, add_special_tokens=False, truncation=False).input_ids:
            yield token, weight


def has_syntax(prompt: str) -> bool:
    """Whether a prompt uses the syntax at all: brackets or escapes that the text loses (even at weight 1), or a
    `BREAK`. A pipeline given such a prompt as text would read the brackets as words."""
    fragments = parse(prompt)
    return any(weight != 1.0 for _, weight in fragments) or "".join(text for text, _ in fragments) != prompt


def plain_text(text: str) -> str:
    """The text a weighted caption or prompt says, without its brackets, weights and `BREAK`s."""
    return "".join(fragment for fragment, weight in parse(text) if weight is not None)


_NETWORK_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)


def network_tag(text: str) -> str | None:
    """The first of the webui's extra-network tags (`<lora:name:0.8>`, `<lyco:...>`, `<hypernet:...>`) in a prompt,
    if any: CLIP would read such a tag as words."""
    found = _NETWORK_TAG.search(text)
    return found[0] if found else None


def lora_tags(text: str) -> tuple[str, list[tuple[str, str, float]]]:
    """The prompt without its `<lora:NAME:W>` / `<lyco:NAME:W>` tags (W defaults to 1, as in the webuis), and each
    tag as (what was written, NAME, W). ValueError names a tag lorakit cannot apply: a hypernetwork, or the webuis'
    separate text-encoder / U-Net strengths (`<lora:NAME:0.8:0.5>`, `unet=`, `te=`, `dyn=`)."""
    tags = []
    for found in _NETWORK_TAG.finditer(text):
        written = found[0]
        kind, name, _ = _tag_parts(written)
        if kind.lower() == "hypernet":
            raise ValueError(f"{written}: hypernetworks are not adapters lorakit loads")
        if not name.strip():
            raise ValueError(f"{written}: no adapter name; write <lora:NAME:0.8>")
        tags.append((written, name.strip(), _strength(written)))
    return _NETWORK_TAG.sub("", text), tags  # removed as the webuis remove them: what is left is encoded as is


def scale_lora_tags(text: str, multiplier: float) -> str:
    """`text` with the strength of each `<lora:NAME:W>` tag multiplied (what a `--compare-scales` column drew)."""

    def scaled(found: re.Match) -> str:
        kind, name, _ = _tag_parts(found[0])
        return f"<{kind}:{name}:{_strength(found[0]) * multiplier:g}>"

    return text if multiplier == 1 else _NETWORK_TAG.sub(scaled, text)


def _tag_parts(written: str) -> tuple[str, str, str]:
    """An extra-network tag `<kind:NAME:W>` as the texts (kind, NAME, W), each as written."""
    kind, _, rest = written[1:-1].partition(":")
    name, _, weight = rest.partition(":")
    return kind, name, weight


def _strength(written: str) -> float:
    """A tag's strength, 1 when it gives none; ValueError, naming the tag, for one that is not one number."""
    kind, name, weight = _tag_parts(written)
    try:
        return float(weight) if weight.strip() else 1.0
    except ValueError:
        why = (
            "lorakit applies one strength to the whole adapter"
            if ":" in weight or "=" in weight
            else f"{weight.strip()!r} is not a number"
        )
        raise ValueError(f"{written}: {why}; write <{kind}:{name.strip()}:0.8>") from None
