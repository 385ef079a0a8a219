"""What `uvit sample` writes: PNGs named by index, samples.jsonl, a grid PNG, an ADM-style .npz."""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uvit_cli.errors import UvitError
from uvit_cli.fileio import atomic_open, atomic_path
from uvit_cli.imageio import read_rgb

INDEX_DIGITS = 5
JSONL = "samples.jsonl"


def png_name(index: int) -> str:
    """`00000.png`, ... (zero-padded to 5 digits, wider past 99999) so names sort in index order."""
    return f"{index:0{INDEX_DIGITS}d}.png"


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


def done_indices(out: Path, indices: Iterable[int]) -> set[int]:
    """Indices whose PNG is there and complete. Ours are written atomically; a file cut short some other
    way (a copy, a sync, a disk error) lacks the closing IEND chunk and is made again."""
    return {i for i in indices if _complete_png(out / png_name(i))}


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


def write_jsonl(out: Path, records: Sequence[dict[str, Any]]) -> Path:
    """One JSON object per image (index order); replaced atomically."""
    path = out / JSONL
    with atomic_open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(out: Path) -> dict[int, dict[str, Any]]:
    """Existing records by index ({} when there is no samples.jsonl)."""
    path = out / JSONL
    if not path.is_file():
        return {}
    records: dict[int, dict[str, Any]] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    r = json.loads(raw.decode("utf-8"))
                    records[int(r["index"])] = r
                except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                    raise UvitError(f"{path}:{n}: not a samples.jsonl record; use another --out") from None
    return records


def write_grid(out: Path, indices: Sequence[int], path: Path, padding: int = 2) -> Path:
    """The images of `indices` read back from `out`, in a near-square grid (torchvision make_grid's
    layout: ceil(sqrt(n)) columns, `padding` black pixels around every tile)."""
    first = read_png(out, indices[0])
    h, w, _ = first.shape
    cols = max(1, math.ceil(math.sqrt(len(indices))))
    rows = math.ceil(len(indices) / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), dtype=np.uint8)
    for k, i in enumerate(indices):
        r, c = divmod(k, cols)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y : y + h, x : x + w] = first if k == 0 else read_png(out, i)
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
