"""What `uvit sample` writes: PNGs named by index, samples.jsonl, a grid PNG (also training's sample grids), an
ADM-style .npz."""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uvit_cli.errors import ConfigError, UvitError
from uvit_cli.fileio import atomic_open, atomic_path
from uvit_cli.imageio import read_rgb

INDEX_DIGITS = 5
JSONL = "samples.jsonl"
# The disk a PNG of a generated image is planned to take: half its raw pixels (photographic samples compress
# to 40-70%, flat ones to less) and the PNG chunks around them.
PNG_OVERHEAD_BYTES = 128


def png_name(index: int) -> str:
    """`00000.png`, ... (zero-padded to 5 digits, wider past 99999) so names sort in index order."""
    return f"{index:0{INDEX_DIGITS}d}.png"


def png_bytes_estimate(side: int) -> int:
    """The disk an RGB PNG of side x side pixels is planned to take (see PNG_OVERHEAD_BYTES above)."""
    return side * side * 3 // 2 + PNG_OVERHEAD_BYTES


def count_pngs(out: Path, total: int) -> int:
    """How many of the images 0..total-1 have a PNG in `out` (complete or not: an estimate of what is done)."""
    count = 0
    try:
        with os.scandir(out) as entries:
            for e in entries:
                stem, _, ext = e.name.partition(".")
                if ext == "png" and stem.isdigit() and int(stem) < total and e.name == png_name(int(stem)):
                    count += 1
    except OSError:  # no folder yet
        return 0
    return count


def check_not_in_checkpoints(out: Path) -> None:
    """Refuse an `out` inside a training run's checkpoint folder (`RUN/ckpts/...`): training prunes old step
    folders with everything in them, so the images would be lost. Symlinks are followed."""
    from uvit_cli.checkpoint import CKPTS, LATEST, PRESET_FILE, list_checkpoints

    where = out.resolve()
    for d in (where, *where.parents):
        if d.name != CKPTS:
            continue
        run = d.parent
        if (run / PRESET_FILE).is_file() or (d / LATEST).is_file() or list_checkpoints(run):
            raise ConfigError(
                f"--out {out}: inside {d}, the checkpoint folder of the run {run}, where training deletes old "
                f"checkpoints with everything in them; choose an --out outside {d}"
            )


def check_writable(out: Path) -> None:
    """Create `out` and prove a file can be written there, or raise one line."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".uvit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UvitError(f"--out {out}: not writable ({e.strerror or e})") from None


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


def png_done(out: Path, index: int) -> bool:
    """Whether image `index` has its PNG there, complete. Ours are written atomically; a file cut short some
    other way (a copy, a sync, a disk error) lacks the closing IEND chunk and is made again."""
    return _complete_png(out / png_name(index))


def _complete_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            if f.tell() < 8 + len(_PNG_END):
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return head == b"\x89PNG\r\n\x1a\n" and f.read() == _PNG_END
    except OSError:
        return False


def write_png(out: Path, index: int, image: np.ndarray) -> None:
    """uint8 (H, W, 3) -> out/<index>.png via a temporary file and an atomic rename (safe to interrupt)."""
    final = out / png_name(index)
    with atomic_path(final) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def read_png(out: Path, index: int) -> np.ndarray:
    return read_rgb(out / png_name(index))


def write_jsonl(out: Path, records: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per image (index order), written as `records` yields them; replaced atomically."""
    path = out / JSONL
    with atomic_open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def iter_jsonl(out: Path) -> Iterator[dict[str, Any]]:
    """The existing records, one line at a time (nothing when there is no samples.jsonl)."""
    path = out / JSONL
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    r = json.loads(raw.decode("utf-8"))
                    int(r["index"])
                except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                    raise UvitError(f"{path}:{n}: not a samples.jsonl record; use another --out") from None
                yield r


def grid_image(images: Iterable[np.ndarray], count: int, padding: int = 2) -> np.ndarray:
    """`count` uint8 (H, W, 3) images of one size in a near-square grid, torchvision make_grid's layout:
    ceil(sqrt(n)) columns, `padding` black pixels around every tile. `images` is read one at a time."""
    cols = max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / cols)
    grid = np.zeros((0, 0, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        h, w, _ = image.shape
        if k == 0:
            grid = np.zeros(
                (rows * (h + padding) + padding, cols * (w + padding) + padding, 3), dtype=np.uint8
            )
        r, c = divmod(k, cols)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y : y + h, x : x + w] = image
    return grid


def save_grid(images: np.ndarray, path: Path, padding: int = 2) -> Path:
    """uint8 images (n, H, W, 3) -> one PNG grid (`grid_image`), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(grid_image(images, len(images), padding)).save(tmp, format="PNG")
    return path


def write_grid(out: Path, indices: Sequence[int], path: Path, padding: int = 2) -> Path:
    """The images of `indices` read back from `out`, one at a time, in a grid (`grid_image`)."""
    grid = grid_image((read_png(out, i) for i in indices), len(indices), padding)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def write_npz(out: Path, indices: Sequence[int], path: Path) -> Path:
    """`arr_0` = uint8 (N, H, W, 3) of the PNGs in index order, as `np.savez` writes it and the ADM
    evaluator reads it; streamed image by image into the zip, so 50k images need no 10 GB array."""
    first = read_png(out, indices[0])
    shape = (len(indices), *first.shape)
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": shape,
    }
    with (
        atomic_path(path) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for k, i in enumerate(indices):
                img = first if k == 0 else read_png(out, i)
                if img.shape != first.shape:
                    raise UvitError(f"{out / png_name(i)}: size {img.shape} differs from {first.shape}")
                f.write(np.ascontiguousarray(img, dtype=np.uint8).tobytes())
    return path
