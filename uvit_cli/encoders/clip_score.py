"""CLIP score of text-to-image samples (Hessel et al. 2021, "CLIPScore"), with CLIP's own image preprocessing.

score(image, prompt) = 100 · max(cos(E_img(image), E_txt(prompt)), 0), averaged over the samples: the "CLIP
score" text-to-image papers report uses w = 100 where the CLIPScore paper uses w = 2.5, and clamps each pair
as that paper does (torchmetrics clamps only the mean; the two agree whenever no cosine is negative).
Embeddings are the projected ones of `CLIPModel` (`clip_vision.py`); prompts are truncated to 77 tokens,
keeping the end token.

Preprocessing is `CLIPImageProcessor`'s for openai/clip-vit-large-patch14 through PIL (transformers 4's
default, transformers 5's `CLIPImageProcessorPil`, OpenAI's `clip.load` transform but for crop rounding):
the shorter side resized to 224 with PIL bicubic on the uint8 image (the longer side `int(224 · long / short)`),
centre crop 224 (offset `(size - 224) // 2`), `x / 255` in float64 cast to float32, then `(x - mean) / std`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch
from PIL import Image

from uvit_cli.errors import DataError

if TYPE_CHECKING:
    from uvit_cli.encoders.clip_vision import CLIPModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224

# One image: PIL (any mode, converted to RGB as `uvit_cli.imageio` does) or uint8 (H, W, 3).
# A batch: a sequence of those, a uint8 array (B, H, W, 3), or a uint8 tensor (B, 3, H, W).
ImageLike: TypeAlias = "Image.Image | np.ndarray"
Images: TypeAlias = "Sequence[ImageLike] | np.ndarray | torch.Tensor"


def _as_pil(image: ImageLike) -> Image.Image:
    from uvit_cli.imageio import to_rgb8

    if isinstance(image, Image.Image):
        return to_rgb8(image)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"CLIP score takes uint8 (H, W, 3) images, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)  # uint8 (H, W, 3): RGB


def clip_preprocess_image(image: ImageLike, size: int = CLIP_SIZE) -> np.ndarray:
    """One image -> (3, size, size) float32 CLIP-normalised pixels (the module docstring gives every step)."""
    im = _as_pil(image)
    w, h = im.size
    long = int(size * max(w, h) / min(w, h))  # transformers' (and torchvision's) rounding: floor
    new_w, new_h = (size, long) if w <= h else (long, size)
    im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = np.asarray(im)[top : top + size, left : left + size]  # (size, size, 3) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # the processor rescales in float64
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)  # float32, as it normalises
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, size, size)


def _image_list(images: Images) -> Sequence[ImageLike]:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DataError(
                f"CLIP score takes uint8 (B, 3, H, W) tensors, got {images.dtype} {tuple(images.shape)}"
            )
        return list(images.permute(0, 2, 3, 1).cpu().numpy())
    return list(images) if isinstance(images, np.ndarray) else images  # (B, H, W, 3): B views


def clip_preprocess(images: Images, size: int = CLIP_SIZE) -> torch.Tensor:
    """A batch of images -> (B, 3, size, size) float32 pixels for `CLIPModel.image_embeds`."""
    return torch.from_numpy(np.stack([clip_preprocess_image(im, size) for im in _image_list(images)]))


def scores_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(B, P), (B, P) -> (B,) float64: 100 · max(cos, 0), row by row; float64, so no float32 rounding here."""
    img, txt = image_embeds.double(), text_embeds.double()  # (B, P)
    cos = (img * txt).sum(dim=-1) / (img.norm(dim=-1) * txt.norm(dim=-1))  # (B,)
    return (100 * cos).clamp(min=0)  # (B,)


@torch.no_grad()
def clip_score_batch(model: CLIPModel, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Preprocessed pixels (B, 3, 224, 224) and their B prompts -> (B,) float64 scores on the CPU."""
    if len(prompts) != pixel_values.shape[0]:
        raise DataError(f"CLIP score: {pixel_values.shape[0]} images but {len(prompts)} prompts")
    device = model.visual_projection.weight.device
    ids = model.tokenizer(list(prompts)).input_ids.to(device)  # (B, 77), truncated keeping the end token
    img = model.image_embeds(pixel_values.to(device, torch.float32))  # (B, P)
    return scores_from_embeddings(img, model.text_embeds(ids)).cpu()


def clip_score(
    images: Images, prompts: Sequence[str], model: CLIPModel, batch_size: int = 64
) -> torch.Tensor:
    """Per-image CLIP scores (N,) float64, 100 · max(cos, 0), of N images against their N prompts.

    Batching only groups the work: each score depends on its own image and prompt. Average them, or feed
    them to a `ClipScoreSum` to combine batches and ranks.
    """
    items = _image_list(images)
    if len(items) != len(prompts):
        raise DataError(f"CLIP score: {len(items)} images but {len(prompts)} prompts")
    if batch_size < 1:
        raise DataError(f"CLIP score: batch size {batch_size}, must be at least 1")
    out = [torch.zeros(0, dtype=torch.float64)]
    for i in range(0, len(items), batch_size):
        pixels = clip_preprocess(items[i : i + batch_size])
        out.append(clip_score_batch(model, pixels, prompts[i : i + batch_size]))
    return torch.cat(out)


@dataclass
class ClipScoreSum:
    """Running (sum, count) of CLIP scores: add batches, merge ranks, read the mean."""

    total: float = 0.0
    count: int = 0

    def add(self, scores: torch.Tensor) -> None:
        self.total += float(scores.double().sum())  # float64: 50,000 scores near 30 keep ~1e-10 relative
        self.count += scores.numel()

    def __add__(self, other: ClipScoreSum) -> ClipScoreSum:
        return ClipScoreSum(self.total + other.total, self.count + other.count)

    def across_ranks(self) -> ClipScoreSum:
        """The sum over every torchrun rank (this one alone when not distributed)."""
        from uvit_cli.dist import all_gather_object

        return sum(all_gather_object(self), ClipScoreSum())

    @property
    def mean(self) -> float:
        if self.count == 0:
            raise DataError("CLIP score of no images: nothing was scored")
        return self.total / self.count
