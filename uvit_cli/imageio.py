"""Decoding image files to 8-bit RGB: the one conversion `uvit prepare`, `uvit fid` and `uvit sample` use,
and the one way they read an input file (`read_regular`: a named pipe, socket or device is refused, never
opened for reading, so it cannot block).

8-bit images (RGB, RGBA, L, LA, P, CMYK, YCbCr, 1-bit, ...) convert exactly as `PIL.Image.convert("RGB")`
does, which is what the official preprocessing and clean-fid do: alpha is dropped, palettes expanded.
`convert("RGB")` clips higher bit depths instead of scaling them (a 16-bit grey value 3084 becomes 255),
so those are scaled here:

    I;16, I;16B, I;16L, I;16N, I    integers 0..65535  ->  round(v / 257)  (v = 257 * u for 8-bit u maps back to u)
    F                               floats 0..1        ->  round(v * 255)

Values outside those ranges (negative, above 65535, above 1, NaN) have no agreed meaning and are refused
with `ValueError`. 16-bit RGB PNGs reach us already reduced to 8 bits by Pillow's decoder (it keeps the
high byte), within one level of the scaling above.
"""

from __future__ import annotations

import io
import os
import stat

import numpy as np
from PIL import Image, UnidentifiedImageError

_INT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def to_rgb8(im: Image.Image) -> Image.Image:
    """`im` as an 8-bit RGB image (see the module docstring for high bit depths)."""
    if im.mode == "RGB":
        return im
    if im.mode in _INT_MODES:
        v = np.asarray(im, dtype=np.int64)
        if v.size and (v.min() < 0 or v.max() > 65535):
            raise ValueError(f"{im.mode} image with values {v.min()}..{v.max()}, outside 0..65535")
        grey = (2 * v + 257) // 514  # round(v / 257), in integers (v / 257 is never a tie)
    elif im.mode == "F":
        v = np.asarray(im, dtype=np.float64)
        if v.size and not (np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0):
            lo, hi = np.nanmin(v), np.nanmax(v)
            raise ValueError(f"float image with values {lo:g}..{hi:g}, outside 0..1 (or NaN)")
        grey = np.rint(v * 255.0)
    else:
        return im.convert("RGB")
    return Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2), mode="RGB")


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
)


class NotARegularFile(ValueError):
    """A path that is a named pipe, socket, device, directory or broken symbolic link: never read."""


def non_regular(path: str | os.PathLike[str]) -> str | None:
    """None for a regular file (or a symbolic link to one), else what `path` is ("a named pipe", ...).

    Reads only the directory entry: a named pipe opened for reading blocks until a writer appears.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "missing"
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file `path`; NotARegularFile, without opening it, for anything else."""
    what = non_regular(path)
    if what is not None and what != "missing":
        raise NotARegularFile(f"{path}: {what}, not a regular file")
    # O_NONBLOCK: if the entry became a named pipe since the check, open() returns instead of waiting
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", closefd=True) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"{path}: not a regular file")
        return f.read()


def decode_rgb(raw: bytes) -> Image.Image:
    """Decode the bytes of an image file fully (a truncated file raises here, not later) as 8-bit RGB."""
    try:
        im = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:  # its own text names the BytesIO object, not the file
        raise UnidentifiedImageError("not an image file Pillow can identify") from None
    with im:
        im.load()
        return to_rgb8(im)


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode `path` fully as an 8-bit RGB image; a named pipe, socket or device is refused unopened."""
    return decode_rgb(read_regular(path))


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """(H, W, 3) uint8 array of `path`."""
    return np.asarray(open_rgb(path))
