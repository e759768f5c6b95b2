"""Adapter file layouts: lorakit's in-memory `LoraState` <-> the kohya and diffusers layouts.

Module paths inside a `LoraState` are the model's own (`named_modules`). transformers 5 dropped
the `text_model.` level from `CLIPTextModel`, while every loader still expects it in adapter
files (kohya `lora_te_text_model_...`, diffusers `text_encoder.text_model....`), so exported
text-encoder names put it back (see FORMATS.md section 0).
"""

from __future__ import annotations


def exported_path(component: str, path: str) -> str:
    """The module path as adapter files spell it (`text_model.` restored for text encoders)."""
    if component.startswith("text_encoder") and not path.startswith("text_model."):
        return "text_model." + path
    return path
