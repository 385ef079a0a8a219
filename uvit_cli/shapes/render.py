"""The captioned-shapes world: attributes, seeded scene specs, Pillow rendering and captions.

One scene = one coloured shape on a plain background. Everything is a pure function of (seed, split,
index), so `uvit prepare shapes` writes the same bytes on every machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Attribute tables. Colours are far apart in RGB (>= 150 apart) so that a nearest-colour rule is exact
# on rendered images and forgiving on generated ones.
BACKGROUND: tuple[int, int, int] = (24, 24, 32)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Centre of the shape's box as a fraction of the image side (x, y), and the phrase the caption uses. The
# corners sit in the four quadrants and the middle between them, so the five are distinct regions of the
# frame for both sizes (docs/quickstart.md).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "middle": (0.5, 0.5),
}
# Side of the shape's bounding box as a fraction of the image side: small enough that a corner shape stays
# in its quadrant, the two far enough apart (1.5x the side, 2.25x the area) to read at 16 px.
SIZES: dict[str, float] = {"small": 0.3, "big": 0.45}
JITTER = 0.03  # uniform centre jitter, fraction of the side, so no two scenes are pixel-identical
SUPERSAMPLE = 4  # draw at 4x and downsample with a box filter: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    size: str
    dx: float = 0.0  # centre jitter, fraction of the side
    dy: float = 0.0

    def caption(self) -> str:
        """The caption that names all four attributes, e.g. "a big red circle at the top left"."""
        where = "in the middle" if self.position == "middle" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"

    def captions(self) -> list[str]:
        """Two phrasings, as COCO has several captions per image; both name every attribute."""
        return [self.caption(), "the" + self.caption()[1:]]


def _rng(seed: int, split: str, skip: int = 0) -> np.random.Generator:
    """The split's stream (`np.random.default_rng` of a digest), `skip` 64-bit draws ahead."""
    # A split's stream is independent of every other split's: the held-out set is not a prefix of train.
    digest = hashlib.sha256(f"uvit-shapes:{seed}:{split}".encode()).digest()
    bits = np.random.PCG64(int.from_bytes(digest[:8], "little"))  # what default_rng(seed) builds
    bits.advance(skip)
    return np.random.Generator(bits)


def sample_scenes(n: int, seed: int = 0, split: str = "train", start: int = 0) -> list[Scene]:
    """Scenes start..start+n-1 of the split, attributes drawn uniformly and independently; deterministic in
    (seed, split), and scene i is the same whichever chunk it is drawn in (so a set is made shard by shard)."""
    # one 64-bit draw per float64, one row of six per scene: scene i does not depend on n or start
    u = _rng(seed, split, skip=6 * start).random((n, 6))
    colours, positions, sizes = list(COLOURS), list(POSITIONS), list(SIZES)

    def pick(options: list[str] | tuple[str, ...], col: int, i: int) -> str:
        return options[min(int(u[i, col] * len(options)), len(options) - 1)]

    return [
        Scene(
            pick(colours, 0, i),
            pick(SHAPES, 1, i),
            pick(positions, 2, i),
            pick(sizes, 3, i),
            float((2 * u[i, 4] - 1) * JITTER),
            float((2 * u[i, 5] - 1) * JITTER),
        )
        for i in range(n)
    ]


def render(scene: Scene, resolution: int = 32) -> np.ndarray:
    """The scene as a uint8 (H, W, 3) image."""
    big = resolution * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[scene.position]
    cx, cy = (cx + scene.dx) * big, (cy + scene.dy) * big
    half = SIZES[scene.size] * big / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif scene.shape == "square":
        draw.rectangle(box, fill=colour)
    elif scene.shape == "triangle":  # apex up, base at the bottom of the box
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=colour)
    else:
        raise ValueError(f"unknown shape {scene.shape!r} (one of {', '.join(SHAPES)})")
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.BOX), dtype=np.uint8)


def render_many(scenes: list[Scene], resolution: int = 32) -> np.ndarray:
    """(n, 3, H, W) uint8, the layout of pixel shards (filled in place: one copy of the images in memory)."""
    out = np.empty((len(scenes), 3, resolution, resolution), np.uint8)
    for i, s in enumerate(scenes):
        out[i] = render(s, resolution).transpose(2, 0, 1)
    return out


def render_peak_bytes(resolution: int) -> int:
    """Memory one `render` holds at its peak: the supersampled canvas (Pillow keeps RGB in 4 bytes a pixel),
    the box-filtered image and its array."""
    big = resolution * SUPERSAMPLE
    return 4 * big * big + 2 * 4 * resolution * resolution


@dataclass(frozen=True)
class Request:
    """What a prompt asks for; None where it names nothing (that attribute is then not scored)."""

    colour: str | None
    shape: str | None
    position: str | None
    size: str | None


def parse_prompt(prompt: str) -> Request:
    """The colour, shape, position and size a prompt names: what the fidelity score checks."""
    words = prompt.lower().replace(",", " ").split()
    text = " ".join(words)
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    size = next((w for w in words if w in SIZES), None)
    position = next((p for p in POSITIONS if p != "middle" and p in text), None)
    if position is None and "middle" in words:
        position = "middle"
    return Request(colour, shape, position, size)
