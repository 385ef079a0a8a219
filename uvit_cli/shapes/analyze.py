"""The weight-free fidelity score: read a sample's background, dominant colour, shape, position and size by plain
image analysis.

No network is involved, so the score means the same on every machine and cannot be fooled by a model's
own features. The rules, in order:
1. background: the median of the one-pixel border must be near `BACKGROUND`;
2. every pixel is read as a blend of the background and one palette colour (the colour whose segment
   background-colour in RGB lies nearest; anti-aliased edges are such blends) and counts as that colour
   when it is at least half of it, else as background; the dominant colour is the most frequent label (at least `MIN_PIXELS` of them, else "no shape");
3. shape: the largest 4-connected blob of the dominant colour. A triangle (apex up) holds 1/4 of its
   area in the top half of its box, a circle or square 1/2; a square fills its box, a circle pi/4 of it
   (measured with soft, anti-aliased coverage, see `classify_blob`);
4. position: the centre of the blob's soft bounding box (the coverage-weighted mean of its column and row
   maxima: the box centre for all three shapes, a triangle included) falls in the named region, the region
   of a point being its nearest `POSITIONS` centre;
5. size: the soft box side sqrt(width x height) against the geometric mean of the two `SIZES`.
`tests/test_shapes.py` checks that these rules read the renderer's own held-out images (nearly) perfectly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from uvit_cli.shapes.render import BACKGROUND, COLOURS, POSITIONS, SIZES, parse_prompt

BACKGROUND_TOLERANCE = 48.0  # RGB distance of the border median from BACKGROUND that still counts as right
MIN_PIXELS = 4
TRIANGLE_TOP_SHARE = 0.38  # top-half share of the blob below this -> triangle (ideal 0.25 vs 0.5)
TRIANGLE_FILL = 0.7  # soft fill below this -> triangle (ideal 0.5)
SQUARE_FILL = 0.9  # soft fill above this -> square (ideal 1.0 vs pi/4 = 0.785 for a circle)
SIZE_SPLIT = float(np.sqrt(np.prod(list(SIZES.values()))))  # box side (fraction) between small and big

_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # (1 + K, 3)
_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Reading:
    """What the analysis sees in one image."""

    background_ok: bool
    colour: str | None  # None: no shape found
    shape: str | None
    position: str | None = None
    size: str | None = None
    fill: float = 0.0  # soft blob area / soft bounding-box area
    top_share: float = 0.0  # share of the blob's area in the top half of its box
    centre: tuple[float, float] = (0.0, 0.0)  # of the soft bounding box, fractions of the side (x, y)
    side: float = 0.0  # sqrt(soft width x soft height), fraction of the side


def _hwc(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {a.shape}")
    return a.astype(np.float32)


def _coverage(mask: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    return mask.astype(np.float32) if alpha is None else alpha * ndimage.binary_dilation(mask)


def classify_blob(mask: np.ndarray, alpha: np.ndarray | None = None) -> tuple[str, float, float]:
    """(shape, fill, top share) of a boolean blob; `alpha` (H, W) in [0, 1] is its soft coverage.

    fill = soft area / (soft width x soft height), the soft extents being the sums of the column and row
    maxima of alpha: anti-aliased edges count by coverage, so a 7-pixel circle does not read as a square.
    """
    alpha = _coverage(mask, alpha)
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


def locate_blob(
    mask: np.ndarray, alpha: np.ndarray | None = None
) -> tuple[str, str, tuple[float, float], float]:
    """(position, size, box centre (x, y), box side) of a blob, as fractions of the image side."""
    alpha = _coverage(mask, alpha)
    h, w = alpha.shape
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)  # (W,), (H,): the soft extents
    x = float((cols * (np.arange(w) + 0.5)).sum() / max(cols.sum(), 1e-6)) / w
    y = float((rows * (np.arange(h) + 0.5)).sum() / max(rows.sum(), 1e-6)) / h
    side = float(np.sqrt(cols.sum() / w * rows.sum() / h))
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)
    return position, ("big" if side > SIZE_SPLIT else "small"), (x, y), side


def blend_labels(a: np.ndarray) -> np.ndarray:
    """(H, W) labels of float RGB pixels: 0 background, k the k-th palette colour (rule 2)."""
    bg, d = _PALETTE[0], _PALETTE[1:] - _PALETTE[0]  # (3,), (K, 3)
    share = np.clip((a - bg) @ d.T / (d * d).sum(-1), 0.0, 1.0)  # (H, W, K): how much of colour k
    residual = np.linalg.norm(a[..., None, :] - bg - share[..., None] * d, axis=-1)  # (H, W, K)
    k = residual.argmin(-1)  # (H, W)
    return np.where(np.take_along_axis(share, k[..., None], -1)[..., 0] >= 0.5, k + 1, 0)


def read_image(image: np.ndarray) -> Reading:
    """Background check, dominant colour and shape of one uint8 image (H, W, 3) or (3, H, W)."""
    a = _hwc(image)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])  # (4H - 4, 3)
    background_ok = bool(np.linalg.norm(np.median(border, axis=0) - _PALETTE[0]) < BACKGROUND_TOLERANCE)
    label = blend_labels(a)  # (H, W): 0 background, k colour k - 1
    counts = np.bincount(label.ravel(), minlength=len(_PALETTE))[1:]
    if counts.max() < MIN_PIXELS:
        return Reading(background_ok, None, None)
    k = int(counts.argmax())
    blobs, n = ndimage.label(label == k + 1)  # 4-connectivity
    sizes = np.bincount(blobs.ravel(), minlength=n + 1)[1:]
    d = _PALETTE[k + 1] - _PALETTE[0]
    alpha = np.clip((a - _PALETTE[0]) @ d / float(d @ d), 0.0, 1.0)  # (H, W) coverage by colour k
    blob = blobs == 1 + int(sizes.argmax())
    shape, fill, top_share = classify_blob(blob, alpha)
    position, size, centre, side = locate_blob(blob, alpha)
    return Reading(background_ok, _NAMES[k], shape, position, size, fill, top_share, centre, side)


ATTRIBUTES = ("colour", "shape", "position", "size")


@dataclass(frozen=True)
class Fidelity:
    """Shares of samples whose colour (with the background right), shape, position and size match their prompt,
    and whose four attributes are all right (`all`); an attribute a prompt does not name counts as right."""

    n: int
    colour: float
    shape: float
    position: float
    size: float
    all: float

    def __str__(self) -> str:
        return (
            f"colour {100 * self.colour:.0f}%, shape {100 * self.shape:.0f}%, position {100 * self.position:.0f}%, "
            f"size {100 * self.size:.0f}%, all four {100 * self.all:.0f}% of {self.n} samples (chance: colour "
            f"{100 / len(COLOURS):.0f}%, shape 33%, position {100 / len(POSITIONS):.0f}%, size {100 / len(SIZES):.0f}%)"
        )


def fidelity(images: np.ndarray | list[np.ndarray], prompts: list[str]) -> Fidelity:
    """Score samples against the prompts that made them (one prompt per image)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    ok = np.zeros((len(prompts), len(ATTRIBUTES)), bool)  # (n, 4)
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        want, r = parse_prompt(prompt), read_image(image)
        found = r.colour is not None
        ok[i] = [
            r.background_ok and found and r.colour == want.colour,
            want.shape is None or (found and r.shape == want.shape),
            want.position is None or (found and r.position == want.position),
            want.size is None or (found and r.size == want.size),
        ]
    if not len(prompts):
        return Fidelity(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    return Fidelity(len(prompts), *(float(v) for v in ok.mean(axis=0)), float(ok.all(axis=1).mean()))
