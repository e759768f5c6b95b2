"""Masks from a segmentation model at `prepare` time: CLIPSeg finds the subject a text prompt names.

CLIPSeg (transformers' `CLIPSegForImageSegmentation`, e.g. CIDAS/clipseg-rd64-refined) scores every pixel for
a phrase such as "a dog", so one model serves any subject a person trains. The segmenter runs on each image
exactly as it was fitted into its bucket, so its mask lines up with the training pixels without a second fitting.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..errors import LorakitError, first_line

SUPPORTED = "CLIPSeg (text-prompted) models such as CIDAS/clipseg-rd64-refined"


class Segmenter:
    """A text-prompted segmentation model (hub id or folder): `segmenter(image)` is a greyscale mask of the image's
    size, white where the model's probability for `prompt` reaches `threshold`."""

    def __init__(self, model: str, prompt: str, threshold: float = 0.4, device: str | None = None):
        import torch
        from transformers import AutoConfig, AutoProcessor, CLIPSegForImageSegmentation

        local = Path(model).expanduser()
        source = str(local) if local.exists() else model
        try:
            kind = AutoConfig.from_pretrained(source).model_type
        except (OSError, ValueError) as err:
            raise LorakitError(f"--mask-model: cannot load {model!r}: {first_line(err)}; give {SUPPORTED}") from None
        if kind != "clipseg":
            raise LorakitError(f"--mask-model: {model!r} is a {kind} model; lorakit segments with {SUPPORTED}")
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = CLIPSegForImageSegmentation.from_pretrained(source).eval()
        except (OSError, ValueError) as err:
            raise LorakitError(f"--mask-model: cannot load {model!r}: {first_line(err)}; give {SUPPORTED}") from None
        self.prompt, self.threshold = prompt, threshold
        self.fingerprint = weights_fingerprint(self.model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    def probabilities(self, image: Any) -> Any:
        """The model's probability of the prompt at each pixel of `image`, as an [H, W] float tensor."""
        import torch

        image = image.convert("RGB")
        inputs = self.processor(text=[self.prompt], images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = self.model(**inputs.to(self.device)).logits
        scores = torch.sigmoid(logits.float().reshape(1, 1, *logits.shape[-2:]))
        resized = torch.nn.functional.interpolate(scores, size=(image.height, image.width), mode="bilinear")
        return resized[0, 0].cpu()

    def __call__(self, image: Any) -> Any:
        from PIL import Image

        found = (self.probabilities(image) >= self.threshold).to("cpu").numpy().astype("uint8") * 255
        return Image.fromarray(found, mode="L")


def weights_fingerprint(model: Any) -> str:
    """The sha256 of a model's parameters and buffers, in name order: a folder whose weights were replaced under the
    same name masks again (150 M float32 parameters, as CLIPSeg rd64 has: 0.4 s on one core here)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def mask_png(segmenter: Segmenter, image_png: bytes) -> bytes | None:
    """The PNG of `segmenter`'s mask for a fitted image (PNG bytes), or None when the model found nothing."""
    from PIL import Image

    with Image.open(io.BytesIO(image_png)) as opened:
        mask = segmenter(opened)
    if not mask.getbbox():  # all black: the prompt's subject is not in the picture
        return None
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
