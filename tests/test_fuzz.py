"""Property-based fuzzing of every reader of untrusted input: corrupted image bytes into prepare, random recipes
and TOML into the recipe loader, damaged and random safetensors into the adapter reader (what `lorakit inspect`,
`merge`, `generate` and `lora.init_from` use), random metadata.jsonl into train's dataset reader. Every case ends in
a result or in lorakit's own error type with a message; nothing else escapes.

The default suite runs a reduced number of cases per target (deterministic, `derandomize`);
`LORAKIT_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz.py` (benchmarks/reliability.py) runs the full count.
"""

from __future__ import annotations

import io
import json
import os
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lorakit.buckets import make_buckets
from lorakit.data import load_folder
from lorakit.errors import AdapterError, DatasetError, RecipeError
from lorakit.formats.read import read_adapter_file
from lorakit.prepare.images import Processed, SizingOptions, process_image
from lorakit.recipe import load_recipe, recipe_from_dict
from lorakit.recipe.sections import SECTIONS

from .messy import textured
from .reliability import FIGURES

EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "60"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _image_bytes(kind: str) -> bytes:
    buffer = io.BytesIO()
    textured(40, 32, 0).save(buffer, format=kind)
    return buffer.getvalue()


IMAGES = {"PNG": _image_bytes("PNG"), "JPEG": _image_bytes("JPEG"), "WEBP": _image_bytes("WEBP")}
SIZING = SizingOptions(32, tuple(make_buckets(32, 8)), 8.0, (255, 255, 255))


@st.composite
def corrupted(draw, original: bytes) -> bytes:
    """`original` with some bytes overwritten, a slice removed or repeated, and possibly cut short."""
    data = bytearray(original)
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(data) - 1))
        end = draw(st.integers(start, min(len(data), start + 64)))
        data[start:end] = data[start:end] * draw(st.integers(0, 3))
    return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_prepare_reads_any_corrupted_image_without_raising(tmp_path, kind):
    path = tmp_path / f"photo.{kind.lower()}"

    @fuzz
    @given(corrupted(IMAGES[kind]))
    def check(data):
        path.write_bytes(data)
        result = process_image(path, path.name, SIZING)
        FIGURES["fuzz cases: prepare images"] += 1
        assert isinstance(result, Processed)
        assert result.reason or result.png  # either dropped with a reason or encoded

    check()


_scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)


@st.composite
def recipes(draw) -> dict:
    recipe = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "extra", ""]), max_size=6, unique=True)):
        cls = SECTIONS.get(section)
        names = list(cls.__dataclass_fields__) if cls else ["key"]
        keys = draw(st.lists(st.sampled_from(names) | st.text(max_size=8), max_size=6, unique=True))
        recipe[section] = draw(st.fixed_dictionaries({k: _values for k in keys})) if draw(st.integers(0, 9)) else 7
    return recipe


@fuzz
@given(recipes())
def test_the_recipe_loader_accepts_or_explains_any_data(recipe):
    FIGURES["fuzz cases: recipes"] += 1
    try:
        recipe_from_dict(recipe)
    except RecipeError as err:
        assert str(err).strip()


def test_the_recipe_loader_accepts_or_explains_any_toml_text(tmp_path):
    path = tmp_path / "recipe.toml"
    pieces = st.sampled_from(["[train]\n", "[model]\n", "base = ", "seed = ", "1e999", "nan", '"x"', "[", "]", "\n"])

    @fuzz
    @given(st.lists(pieces | st.text(string.printable, max_size=10), max_size=20))
    def check(parts):
        path.write_text("".join(parts))
        FIGURES["fuzz cases: recipe files"] += 1
        try:
            load_recipe(path)
        except RecipeError as err:
            assert str(err).strip()

    check()


def _adapter_bytes() -> bytes:
    generator = torch.Generator().manual_seed(0)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{stem}.lora_down.weight": torch.randn(4, 32, generator=generator).half(),
        f"{stem}.lora_up.weight": torch.randn(32, 4, generator=generator).half(),
        f"{stem}.alpha": torch.tensor(4.0),
    }
    buffer = io.BytesIO()
    from safetensors.torch import save

    buffer.write(save(tensors, metadata={"ss_network_dim": "4"}))
    return buffer.getvalue()


ADAPTER = _adapter_bytes()


def test_the_adapter_reader_accepts_or_explains_damaged_files(tmp_path):
    path = tmp_path / "adapter.safetensors"

    @fuzz
    @given(corrupted(ADAPTER))
    def check(data):
        path.write_bytes(data)
        FIGURES["fuzz cases: adapter files (damaged bytes)"] += 1
        try:
            read_adapter_file(path)
        except AdapterError as err:
            assert str(path) in str(err)

    check()


_STEMS = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_unet_mid_block_resnets_0_conv1",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lycoris_unet_mid_block_attentions_0_proj_in",
]
_SUFFIXES = [
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lokr_w1",
    ".lokr_w2",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".lora_magnitude_vector",
    ".dora_scale",
    ".weight",
]
_META = st.dictionaries(
    st.sampled_from(["lora_adapter_metadata", "ss_network_dim", "ss_network_alpha", "ss_base_model_version"]),
    st.one_of(st.text(max_size=20), st.just('{"unet.r": 0}'), st.just('{"unet.lora_alpha": NaN}'), st.just("[1]")),
    max_size=3,
)


@st.composite
def random_adapters(draw) -> tuple[dict, dict]:
    tensors = {}
    for _ in range(draw(st.integers(1, 6))):
        key = draw(st.sampled_from(_STEMS)) + draw(st.sampled_from(_SUFFIXES))
        shape = draw(st.lists(st.integers(0, 5), max_size=4))
        value = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -2.0]))
        tensors[key] = torch.full(shape, value) if draw(st.booleans()) else torch.randn(shape)
    return tensors, draw(_META)


def test_the_adapter_reader_accepts_or_explains_random_tensors(tmp_path):
    path = tmp_path / "adapter.safetensors"

    @fuzz
    @given(random_adapters())
    def check(adapter):
        tensors, metadata = adapter
        save_file(tensors, str(path), metadata=metadata)
        FIGURES["fuzz cases: adapter files (random tensors)"] += 1
        try:
            read_adapter_file(path)
        except AdapterError as err:
            assert str(path) in str(err)

    check()


_ROW_VALUES = st.one_of(
    st.sampled_from(["images/0.png", "images/1.png", "../0.png", "/etc/hostname", "images", "", "images/none.png"]),
    st.text(max_size=10),
    st.integers(),
    st.none(),
)


@st.composite
def metadata_lines(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)):
            row = draw(st.dictionaries(st.sampled_from(["file_name", "text", "sha256", "crop_left"]), _ROW_VALUES))
            lines.append(json.dumps(row))
        else:
            lines.append(draw(st.text(max_size=20)))
    return "\n".join(lines)


def test_the_dataset_reader_accepts_or_explains_any_metadata(tmp_path):
    folder = tmp_path / "dataset"
    (folder / "images").mkdir(parents=True)
    for index in range(2):
        textured(48, 40, index).save(folder / "images" / f"{index}.png")
    buckets = make_buckets(64, 16)

    @fuzz
    @given(metadata_lines())
    def check(text):
        (folder / "metadata.jsonl").write_text(text)
        FIGURES["fuzz cases: dataset metadata"] += 1
        try:
            load_folder(folder, trigger="ohwx", repeats=1, buckets=buckets)
        except DatasetError as err:
            assert str(err).strip()

    check()
