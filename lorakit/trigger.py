"""The trigger-word rule, one meaning for `prepare`, `train` and `generate`.

A caption "has" the trigger when the trigger appears in it as whole words (case-insensitive): `sks` is in
"a sks ball" and "photo of SKS, red", not in "sksx" or "tasks". Otherwise the trigger goes at the front.
"""

from __future__ import annotations

import re


def contains_trigger(text: str, trigger: str) -> bool:
    """Whether `trigger` appears in `text` as whole words, ignoring case."""
    if not trigger:
        return False
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text, re.IGNORECASE) is not None


def replace_trigger(caption: str, trigger: str, word: str) -> str:
    """`caption` with every whole-word occurrence of `trigger` (any case) replaced by `word`."""
    return re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", lambda _: word, caption, flags=re.IGNORECASE)


def with_trigger(caption: str, trigger: str) -> str:
    """`caption` with `trigger` put at the front, unless the caption already contains it."""
    caption = caption.strip()
    if not trigger or contains_trigger(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger
