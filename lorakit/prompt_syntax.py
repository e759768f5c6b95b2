"""AUTOMATIC1111's prompt syntax, parsed: `(word)` multiplies the attention of its tokens by 1.1, `[word]` divides it
by 1.1, `(word:1.3)` sets the factor to 1.3; brackets nest (`((word))` is 1.21), one left open applies to the end of
the text, and `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters. `BREAK` (upper case, a word of its
own) marks the start of a new 75-token chunk. Rendering (`emphasis`) and kohya's weighted captions (`models`) read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

EMPHASIS = 1.1  # what one pair of round brackets multiplies by (square brackets divide)
STRENGTH_LIMIT = 100.0  # an adapter's strength, on --lora and in lbw= / te= / unet=; ComfyUI's slider spans the same
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


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:NAME:...>` tag as the webuis read it: the text-encoder strength (the first number, or te=), the
    U-Net's (the second number, or unet=; else the text encoder's) and LoRA Block Weight's `lbw=` (also as the
    second item when that is not a number)."""

    written: str
    kind: str
    name: str
    te: float = 1.0
    unet: float = 1.0
    blocks: str = ""
    start: int = 0  # the first denoising step the U-Net part is on (start=, or step=A-B's A)
    stop: int | None = None  # the step it is off from (stop=, or step=A-B's B); None: to the end


def lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its `<lora:...>` / `<lyco:...>` tags, and each tag read. ValueError names a tag lorakit
    cannot apply: a hypernetwork, a dynamic rank (dyn=), a step range (start= / stop= / step=), element weights
    (lbwe=), or a strength that is not a number."""
    tags = []
    for found in _NETWORK_TAG.finditer(text):
        written = found[0]
        kind, name, *items = written[1:-1].split(":")
        name = name.strip()
        if kind.lower() == "hypernet":
            raise ValueError(f"{written}: hypernetworks are not adapters lorakit loads")
        if not name:
            raise ValueError(f"{written}: no adapter name; write <lora:NAME:0.8>")
        tags.append(_read_tag(written, kind, name, [item.strip() for item in items]))
    return _NETWORK_TAG.sub("", text), tags  # removed as the webuis remove them: what is left is encoded as is


_TAG_REFUSED = {
    "dyn": "a dynamic rank (dyn=) is not applied: lorakit draws every rank",
    "lbwe": "element weights (lbwe=) are not read; weight whole blocks with lbw=",
}
TAG_OPTIONS = ("te", "unet", "lbw", "start", "stop", "step")


def _read_tag(written: str, kind: str, name: str, items: list[str]) -> LoraTag:
    named = dict(item.split("=", 1) for item in items if "=" in item)
    named = {key.strip().lower(): value.strip() for key, value in named.items()}
    positional = [item for item in items if "=" not in item and item]
    for key in named:
        if key in _TAG_REFUSED:
            raise ValueError(f"{written}: {_TAG_REFUSED[key]}")
        if key not in TAG_OPTIONS:
            raise ValueError(f"{written}: {key}= is not a tag option lorakit reads ({'=, '.join(TAG_OPTIONS)}=)")
    if len(positional) > 2:
        raise ValueError(f"{written}: {_TAG_REFUSED['dyn']}; write <{kind}:{name}:TE:UNET> at most")
    blocks = named.get("lbw", "")
    if len(positional) == 2 and not is_number(positional[1]) and not blocks:
        blocks = positional.pop()  # the extension's older form, <lora:NAME:1:OUTALL>
    te = _number(named.get("te", positional[0] if positional else "1"), written, kind, name)
    unet = _number(named["unet"], written, kind, name) if "unet" in named else None
    if unet is None:
        unet = _number(positional[1], written, kind, name) if len(positional) == 2 else te
    try:
        start, stop = step_range(named.get("start"), named.get("stop"), named.get("step"))
    except ValueError as err:
        raise ValueError(f"{written}: {err}") from None
    return LoraTag(written, kind, name, te, unet, blocks, start, stop)


def step_range(start: str | None, stop: str | None, step: str | None) -> tuple[int, int | None]:
    """The webuis' `start=A`, `stop=B` and `step=A-B` as (first step on, step off from; None: the end). ValueError
    for what is not a whole number of steps."""
    if step is not None:
        if start is not None or stop is not None:
            raise ValueError("step=A-B gives both ends; leave out start= / stop=")
        start, sep, stop = step.partition("-")
        if not sep:
            raise ValueError(f"step={step}: write step=A-B, the first step and the step it ends at")
    values = []
    for key, text in (("start", start), ("stop", stop)):
        if text is None:
            values.append(None)
        elif text.strip().isdigit():
            values.append(int(text))
        else:
            raise ValueError(f"{key}={text}: give a whole number of denoising steps, e.g. {key}=10")
    first, end = values
    if first is not None and end is not None and end <= first:
        raise ValueError(f"stop={end} is not after start={first}; the adapter would never be on")
    return first or 0, end


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, written: str, kind: str, name: str) -> float:
    """A tag's strength; ValueError, naming the tag, for one that is not a number."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{written}: {text!r} is not a number; write <{kind}:{name}:0.8>") from None


def scale_lora_tags(text: str, multiplier: float) -> str:
    """`text` with the strengths of each `<lora:...>` tag multiplied (what a `--compare-scales` column drew)."""

    def scaled(found: re.Match) -> str:
        kind, name, *items = found[0][1:-1].split(":")
        tag = _read_tag(found[0], kind, name.strip(), [item.strip() for item in items])
        return tag_text(tag.name, tag.te * multiplier, tag.unet * multiplier, tag.blocks, kind, tag.start, tag.stop)

    return text if multiplier == 1 else _NETWORK_TAG.sub(scaled, text)


def tag_text(
    name: str, te: float, unet: float, blocks: str = "", kind: str = "lora", start: int = 0, stop: int | None = None
) -> str:
    """The webuis' tag for an adapter at these strengths: `<lora:NAME:TE>`, with `:UNET` when it differs,
    `:lbw=SPEC` when blocks are weighted and `:start=A` / `:stop=B` for a step range."""
    options = (f":lbw={blocks}" if blocks else "") + (f":start={start}" if start else "")
    options += f":stop={stop}" if stop is not None else ""
    return f"<{kind}:{name}:{te:g}" + (f":{unet:g}" if unet != te else "") + options + ">"
