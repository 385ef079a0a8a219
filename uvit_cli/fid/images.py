"""Where images come from: a folder of files or an `.npz` of uint8 NHWC images (`arr_0`), read in a stream."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uvit_cli.errors import DataError

IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
# Files a sample folder legitimately holds beside its images (stamps, prompts, logs): skipped, not errors.
# (.jsonl: the samples.jsonl that `uvit sample` writes beside its PNGs)
SIDECAR_EXTENSIONS = {".json", ".jsonl", ".toml", ".txt", ".yaml", ".yml", ".log", ".md", ".csv"}
# What `uvit sample --grid --npz` writes beside its PNGs: not samples, skipped in a folder that holds samples.jsonl.
SAMPLE_FOLDER_EXTRAS = {"grid.png", "samples.npz"}


@dataclass
class ImageListing:
    """An image folder as `uvit fid` reads it: the image files in order, and the entries skipped unopened
    because they are not regular files (named pipes, sockets, devices, broken links), with what each is."""

    images: list[Path]
    skipped: list[tuple[Path, str]]


def scan_images(folder: str | os.PathLike) -> ImageListing:
    """Image files under `folder` (recursive, sorted like clean-fid) and the non-regular entries skipped; any
    other regular non-sidecar file is an error. Entries are only stat'ed here: a named pipe is never opened."""
    from uvit_cli.imageio import non_regular

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"not a folder or .npz: {root}")
    try:
        paths = sorted(root.rglob("*"))
    except OSError as e:
        raise DataError(f"cannot read folder {root}: {e.strerror or e}") from None
    images, strays, skipped = [], [], []
    for p in paths:
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        what = non_regular(p)  # None: a regular file, or a link to one
        if what == "a directory":
            continue
        if what is not None:
            skipped.append((p, what))
            continue
        if p.name in SAMPLE_FOLDER_EXTRAS and (p.parent / "samples.jsonl").is_file():
            continue
        ext = p.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(p)
        elif ext not in SIDECAR_EXTENSIONS:
            strays.append(p)
    if strays:
        more = f" and {len(strays) - 1} more" if len(strays) > 1 else ""
        raise DataError(f"not an image file among the images: {strays[0]}{more}; move it out of {root}")
    if not images:
        also = f"; skipped {_entries(len(skipped))} that are not regular files" if skipped else ""
        raise DataError(f"no images in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}){also}")
    return ImageListing(images, skipped)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files of `scan_images`, in order."""
    return scan_images(folder).images


def skipped_note(folder: str | os.PathLike, skipped: list[tuple[Path, str]], shown: int = 3) -> str | None:
    """One line naming the first `shown` skipped entries and what each is; None when none was skipped."""
    if not skipped:
        return None
    root = Path(folder)
    named = "; ".join(f"{p.relative_to(root)} ({what})" for p, what in skipped[:shown])
    more = f", and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"{root}: skipped {_entries(len(skipped))} that are not regular files, never opened: {named}{more}"


def _entries(n: int) -> str:
    return "1 entry" if n == 1 else f"{n} entries"


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8: for 8-bit files exactly clean-fid's `PIL.Image.open(...).convert('RGB')`; higher bit
    depths scaled, not clipped (`uvit_cli.imageio`)."""
    from uvit_cli.imageio import read_rgb

    return read_rgb(path)


class ImageFiles:
    """Map-style dataset for a DataLoader: decode + the mode's CPU resize in the workers.

    Returns (image float32 (3,H,W) in [0,255], original (H, W), error text, the decoded uint8 (H, W, 3)
    image when `keep_original` (CLIP scores it at its own size) else None). Errors travel as text so the
    main process can raise one clean line (DataLoader would wrap a worker's exception in a traceback).
    """

    def __init__(
        self, files: list[Path], resize: Callable[[np.ndarray], np.ndarray], keep_original: bool = False
    ):
        self.files, self.resize, self.keep_original = files, resize, keep_original

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, tuple[int, int], str, Any]:
        import torch

        try:
            img = read_image(self.files[i])
        except Exception as e:
            return None, (0, 0), f"cannot decode {self.files[i]} as an image: {str(e).splitlines()[0]}", None
        out = np.asarray(self.resize(img), dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
        return x, img.shape[:2], "", img if self.keep_original else None


def collate(
    items: list[tuple[Any, tuple[int, int], str, Any]],
) -> tuple[Any, list[tuple[int, int]], str, list[np.ndarray] | None]:
    """Stack a batch; a decode error or two tensor sizes in one batch come back as text instead."""
    import torch

    errors = [e for _, _, e, _ in items if e]
    sizes = [s for _, s, _, _ in items]
    if errors:
        return None, sizes, errors[0], None
    shapes = {tuple(t.shape) for t, _, _, _ in items}
    if len(shapes) > 1:
        # only legacy_tensorflow leaves images unresized here (it resizes inside the network)
        return (
            None,
            sizes,
            f"legacy_tensorflow needs images of one size, found {sorted(set(sizes))[:3]}",
            None,
        )
    originals = [o for _, _, _, o in items] if items[0][3] is not None else None
    return torch.stack([t for t, _, _, _ in items]), sizes, "", originals


def npz_images_info(path: str | os.PathLike) -> tuple[int, tuple[int, ...]]:
    """(number of images, shape) of `arr_0` in an npz, read from the header only."""
    with _open_arr0(Path(path)) as (_, shape, _offset):
        return shape[0], shape


class _open_arr0:
    """Context: the `arr_0.npy` member of an npz as a stream positioned after its header."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> tuple[Any, tuple[int, ...], int]:
        p = self.path
        try:
            self.zip = zipfile.ZipFile(p)
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read {p} as an .npz: {e}") from None
        if "arr_0.npy" not in self.zip.namelist():
            self.zip.close()
            raise DataError(
                f"{p} has no `arr_0` images (an npz of uint8 NHWC images, as ADM's sample batches)"
            )
        self.f = self.zip.open("arr_0.npy")
        try:
            major, _ = np.lib.format.read_magic(self.f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(self.f)
        except ValueError as e:
            self.__exit__()
            raise DataError(f"{p}: arr_0 is not a readable array: {e}") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            self.__exit__()
            raise DataError(f"{p}: arr_0 is {dtype} {tuple(shape)}, want uint8 (N, H, W, 3) images")
        return self.f, tuple(shape), self.f.tell()

    def __exit__(self, *exc: Any) -> None:
        if hasattr(self, "f"):
            self.f.close()
        self.zip.close()


def npz_batches(
    path: str | os.PathLike, batch_size: int, start: int = 0, stop: int | None = None
) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of images [start, stop) of `arr_0`, never holding the whole array."""
    with _open_arr0(Path(path)) as (f, shape, offset):
        n, row = shape[0], int(np.prod(shape[1:]))
        stop = n if stop is None else min(stop, n)
        f.seek(offset + start * row)
        for i in range(start, stop, batch_size):
            k = min(batch_size, stop - i)
            buf = f.read(k * row)
            if len(buf) != k * row:
                raise DataError(f"{path}: arr_0 ends early (truncated file?)")
            yield np.frombuffer(buf, np.uint8).reshape(k, *shape[1:])


def folder_prompts(folder: Path, files: list[Path]) -> list[str]:
    """The prompt of each image file of a `uvit sample` folder, from its samples.jsonl (index -> PNG name)."""
    from uvit_cli.sample.outputs import JSONL, iter_jsonl, png_name

    by_name = {png_name(int(r["index"])): r.get("prompt") for r in iter_jsonl(folder)}
    if not by_name:
        raise DataError(f"{folder}: no {JSONL} with the images' prompts, which CLIP score needs")
    out = []
    for f in files:
        text = by_name.get(f.name) if f.parent == folder else None
        if not isinstance(text, str):
            raise DataError(f"{f}: no prompt for this image in {folder / JSONL}, which CLIP score needs")
        out.append(text)
    return out


def write_adm_batch(
    folder: str | os.PathLike, out: str | os.PathLike, progress: Callable[[int, int], None] | None = None
) -> tuple[Path, tuple[int, ...]]:
    """A folder of images as an ADM sample batch: `arr_0` uint8 (N, H, W, 3) in sorted file order, the layout
    `np.savez` writes and ADM's evaluator streams (uncompressed zip member, .npy header 1.0). Written one
    image at a time, atomically; every image must have the first one's size. Returns (path, shape)."""
    from uvit_cli.fileio import atomic_path
    from uvit_cli.resources import require_disk

    root, path = Path(folder), Path(out)
    files = list_images(root)
    first = read_image(files[0])
    shape = (len(files), *first.shape)
    require_disk(
        path.parent,
        "the ADM sample batch",
        int(np.prod(shape)) + 4096,
        fix="free space or pass another --out",
    )
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": shape,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for k, file in enumerate(files):
                img = first if k == 0 else read_image(file)
                if img.shape != first.shape:
                    raise DataError(
                        f"{file}: {img.shape[1]}x{img.shape[0]}, but {files[0].name} is "
                        f"{first.shape[1]}x{first.shape[0]}: an ADM batch holds images of one size"
                    )
                f.write(np.ascontiguousarray(img, np.uint8).tobytes())
                if progress is not None:
                    progress(k + 1, len(files))
    return path, shape
