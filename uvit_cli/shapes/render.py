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
# Centre of the shape as a fraction of the image side (x, y), and the phrase the caption uses.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.38, 0.38),
    "top right": (0.62, 0.38),
    "bottom left": (0.38, 0.62),
    "bottom right": (0.62, 0.62),
    "middle": (0.5, 0.5),
}
# Side of the shape's bounding box as a fraction of the image side. Large on purpose: the shape fills
# most of the image (a corner position shifts it towards that corner rather than into it), so a tiny
# network at 8-16 px sees it span many patches and learns its colour and outline quickly (docs/quickstart.md has the measurements).
SIZES: dict[str, float] = {"small": 0.55, "big": 0.7}
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

    def captions(self) -> list[str]:
        """Two phrasings, as COCO has several captions per image: with and without the size."""
        where = "in the middle" if self.position == "middle" else f"at the {self.position}"
        return [
            f"a {self.size} {self.colour} {self.shape} {where}",
            f"a {self.colour} {self.shape} {where}",
        ]


def _rng(seed: int, split: str) -> np.random.Generator:
    # A split's stream is independent of every other split's: the held-out set is not a prefix of train.
    digest = hashlib.sha256(f"uvit-shapes:{seed}:{split}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_scenes(n: int, seed: int = 0, split: str = "train") -> list[Scene]:
    """n scenes with attributes drawn uniformly and independently; deterministic in (seed, split)."""
    u = _rng(seed, split).random((n, 6))  # one row per scene: scene i does not depend on n
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
    """(n, 3, H, W) uint8, the layout of pixel shards."""
    if not scenes:
        return np.zeros((0, 3, resolution, resolution), np.uint8)
    return np.stack([render(s, resolution) for s in scenes]).transpose(0, 3, 1, 2).copy()


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """The colour and shape a prompt names (None where it names none): what the fidelity score checks."""
    words = prompt.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape
