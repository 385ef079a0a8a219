"""Checking a prepared set: the cheap check every reader runs at start, and the full hash check on demand.

`check_files` reads only directory entries and .npy headers: every file the manifest lists is there, each
array holds the rows the manifest counts, and its size is what its header says (a truncated file is
shorter). `verify` recomputes every file's sha256 against the manifest (flipped bytes are found only so):
`uvit prepare verify DIR`, and every rerun of `uvit prepare` on its shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from uvit_cli.data.format import EMPTY_CONTEXT, MANIFEST, read_manifest, split_entry
from uvit_cli.errors import DataError
from uvit_cli.fileio import sha256_file

REMAKE = "rerun the same uvit prepare command to re-make it"


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of a C-order .npy file whose size matches its header; DataError
    naming what is wrong."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {REMAKE}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise DataError(f"{path}: not a .npy array ({e}); {REMAKE}") from None
    if dtype.hasobject:
        raise DataError(f"{path}: holds Python objects, not numbers; {REMAKE}")
    if fortran and len(shape) > 1:
        raise DataError(f"{path}: stored in Fortran order, not as uvit prepare writes it; {REMAKE}")
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != want:
        raise DataError(f"{path}: {size} bytes, its header says {want} (truncated or damaged); {REMAKE}")
    return tuple(shape), dtype, offset


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy file whose size matches its header (see `npy_layout`)."""
    shape, dtype, _ = npy_layout(path)
    return shape, dtype


def check_files(
    root: str | os.PathLike[str], manifest: dict[str, Any] | None = None, split: str = "train"
) -> None:
    """The cheap start-up check of one split (module docstring); raises DataError naming the bad file."""
    root = Path(root)
    manifest = read_manifest(root) if manifest is None else manifest
    entry = split_entry(manifest, root, split)
    views, shape = int(manifest["views"]), tuple(manifest["shape"])
    text = manifest["conditioning"] == "text"
    if text:
        ctx_shape = tuple(manifest.get("context_shape") or ())
        got, _ = npy_header(root / EMPTY_CONTEXT)
        if ctx_shape and got != ctx_shape:
            raise DataError(f"{root / EMPTY_CONTEXT}: shape {got}, the manifest says {ctx_shape}; {REMAKE}")
    for shard in entry["shards"]:
        d = root / split / shard["name"]
        if not d.is_dir():
            raise DataError(f"{d}: shard missing; {REMAKE}")
        n = shard["count"]
        for name in shard["sha256"]:
            path = d / name
            if not name.endswith(".npy"):
                if not path.is_file():
                    raise DataError(f"{path}: missing; {REMAKE}")
                continue
            got, _ = npy_header(path)
            want: tuple[int, ...] | None = {
                "x.npy": (n, views, *shape),
                "y.npy": (n,),
                "context_offsets.npy": (n + 1,),
            }.get(name)
            if name == "context.npy":
                want = (shard.get("captions", got[0]), *got[1:])
            if want is not None and got != want:
                raise DataError(f"{path}: shape {got}, the manifest expects {want}; {REMAKE}")
        if text and n and "context.npy" not in shard["sha256"]:
            raise DataError(f"{d}: no context.npy for a text set; {REMAKE}")


def verify(
    root: str | os.PathLike[str],
    split: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, int]:
    """Recompute every file's sha256 against the manifest, for `split` or every split; returns the number
    of files checked per split. `progress(split, shards_done, shards)` is called after each shard."""
    root = Path(root)
    manifest = read_manifest(root)
    names = [split] if split is not None else list(manifest["splits"])
    if not names:
        raise DataError(f"{root / MANIFEST}: no splits; {REMAKE}")
    checked = {}
    for name in names:
        check_files(root, manifest, name)
        shards = split_entry(manifest, root, name)["shards"]
        checked[name] = 0
        for k, shard in enumerate(shards):
            for file, digest in shard["sha256"].items():
                path = root / name / shard["name"] / file
                if sha256_file(path) != digest:
                    raise DataError(f"{path}: modified since it was written (sha256 mismatch); {REMAKE}")
                checked[name] += 1
            if progress:
                progress(name, k + 1, len(shards))
    return checked


def shard_is_intact(shard_dir: Path, sha256: dict[str, str]) -> bool:
    """Every file of a finished shard is there and hashes to what its meta recorded."""
    try:
        return all(sha256_file(shard_dir / name) == digest for name, digest in sha256.items())
    except OSError:
        return False
