"""The weight-free fidelity score: read a sample's background, dominant colour and shape by plain image analysis.

No network is involved, so the score means the same on every machine and cannot be fooled by a model's
own features. The rules, in order:
1. background: the median of the one-pixel border must be near `BACKGROUND`;
2. every pixel takes the nearest of {background, palette colours}; the dominant colour is the most
   frequent non-background label (at least `MIN_PIXELS` of them, else "no shape");
3. shape: the largest 4-connected blob of the dominant colour. A triangle (apex up) holds 1/4 of its
   area in the top half of its box, a circle or square 1/2; a square fills its box, a circle pi/4 of it
   (measured with soft, anti-aliased coverage, see `classify_blob`).
`tests/test_shapes.py` checks that these rules read the renderer's own images (nearly) perfectly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from uvit_cli.shapes.render import BACKGROUND, COLOURS, parse_prompt

BACKGROUND_TOLERANCE = 48.0  # RGB distance of the border median from BACKGROUND that still counts as right
MIN_PIXELS = 4
TRIANGLE_TOP_SHARE = 0.38  # top-half share of the blob below this -> triangle (ideal 0.25 vs 0.5)
TRIANGLE_FILL = 0.7  # soft fill below this -> triangle (ideal 0.5)
SQUARE_FILL = 0.9  # soft fill above this -> square (ideal 1.0 vs pi/4 = 0.785 for a circle)

_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # (1 + K, 3)
_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Reading:
    """What the analysis sees in one image."""

    background_ok: bool
    colour: str | None  # None: no shape found
    shape: str | None
    fill: float = 0.0  # soft blob area / soft bounding-box area
    top_share: float = 0.0  # share of the blob's area in the top half of its box


def _hwc(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {a.shape}")
    return a.astype(np.float32)


def classify_blob(mask: np.ndarray, alpha: np.ndarray | None = None) -> tuple[str, float, float]:
    """(shape, fill, top share) of a boolean blob; `alpha` (H, W) in [0, 1] is its soft coverage.

    fill = soft area / (soft width x soft height), the soft extents being the sums of the column and row
    maxima of alpha: anti-aliased edges count by coverage, so a 7-pixel circle does not read as a square.
    """
    alpha = mask.astype(np.float32) if alpha is None else alpha * ndimage.binary_dilation(mask)
    fill = float(alpha.sum() / max(alpha.max(axis=0).sum() * alpha.max(axis=1).sum(), 1e-6))
    rows = np.nonzero(mask)[0]
    top, bottom = rows.min(), rows.max()
    h = bottom - top + 1
    per_row = mask[top : bottom + 1].sum(axis=1).astype(np.float64)  # (h,)
    # Top half of the box; the middle row of an odd-height box counts half to each side.
    weights = np.clip(h / 2.0 - np.arange(h), 0.0, 1.0)
    top_share = float((per_row * weights).sum() / max(per_row.sum(), 1.0))
    if top_share < TRIANGLE_TOP_SHARE or fill < TRIANGLE_FILL:
        return "triangle", fill, top_share
    return ("square" if fill > SQUARE_FILL else "circle"), fill, top_share


def read_image(image: np.ndarray) -> Reading:
    """Background check, dominant colour and shape of one uint8 image (H, W, 3) or (3, H, W)."""
    a = _hwc(image)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])  # (4H - 4, 3)
    background_ok = bool(np.linalg.norm(np.median(border, axis=0) - _PALETTE[0]) < BACKGROUND_TOLERANCE)
    dist = np.linalg.norm(a[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 1 + K)
    label = dist.argmin(-1)  # (H, W): 0 background, k colour k - 1
    counts = np.bincount(label.ravel(), minlength=len(_PALETTE))[1:]
    if counts.max() < MIN_PIXELS:
        return Reading(background_ok, None, None)
    k = int(counts.argmax())
    blobs, n = ndimage.label(label == k + 1)  # 4-connectivity
    sizes = np.bincount(blobs.ravel(), minlength=n + 1)[1:]
    d = _PALETTE[k + 1] - _PALETTE[0]
    alpha = np.clip((a - _PALETTE[0]) @ d / float(d @ d), 0.0, 1.0)  # (H, W) coverage by colour k
    shape, fill, top_share = classify_blob(blobs == 1 + int(sizes.argmax()), alpha)
    return Reading(background_ok, _NAMES[k], shape, fill, top_share)


@dataclass(frozen=True)
class Fidelity:
    """Shares of samples whose colour (with the background right) and shape match their prompt."""

    n: int
    colour: float
    shape: float
    both: float

    def __str__(self) -> str:
        return (
            f"colour {100 * self.colour:.0f}%, shape {100 * self.shape:.0f}%, both {100 * self.both:.0f}% "
            f"of {self.n} samples (chance: colour {100 / len(COLOURS):.0f}%, shape 33%)"
        )


def fidelity(images: np.ndarray | list[np.ndarray], prompts: list[str]) -> Fidelity:
    """Score samples against the prompts that made them (one prompt per image)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    colour_ok, shape_ok = [], []
    for image, prompt in zip(images, prompts, strict=True):
        want_colour, want_shape = parse_prompt(prompt)
        r = read_image(image)
        colour_ok.append(r.background_ok and r.colour is not None and r.colour == want_colour)
        shape_ok.append(r.shape is not None and r.shape == want_shape)
    c, s = np.array(colour_ok, bool), np.array(shape_ok, bool)
    n = len(prompts)
    return Fidelity(
        n, float(c.mean()) if n else 0.0, float(s.mean()) if n else 0.0, float((c & s).mean()) if n else 0.0
    )
