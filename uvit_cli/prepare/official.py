"""Import feature directories written by the official U-ViT extraction scripts into shards (spec §5.1-5.4).

    coco256_features/                  scripts/extract_mscoco_feature.py + extract_empty_feature.py
        empty_context.npy              CLIP("") (77, 768) float32
        train/<idx>.npy                moments (8, 32, 32) float32 of the idx-th image (sorted COCO image ids)
        train/<idx>_<k>.npy            CLIP features (77, 768) float32 of its k-th caption; val/ alike
        run_vis/                       visualisation prompts (not imported)
    imagenet256_features/<idx>.npy     scripts/extract_imagenet_feature.py: a pickled object array
                                       (moments (8, 32, 32) float32, label int64); per batch of 256 images
                                       the 256 originals, then their 256 mirror images

The arrays are copied, not recomputed: no encoder runs. Every official file becomes one item (views = 1),
so an ImageNet image and its mirror image are two items, as in the official `FeatureDataset`. The official
directories store no keys or caption texts, so an item's key is its file index. ImageNet sets get
`num_classes` 1000 (the official K; CFG's null label is 1000) and no class names.

ImageNet files are pickles, which can run code when loaded with `np.load(allow_pickle=True)` (what the
official reader does). They are read here with an unpickler that only builds numpy arrays and scalars.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from uvit_cli import data, resources
from uvit_cli.config import OfficialKind, dataset_name, set_dir
from uvit_cli.data.writer import SourceDigests
from uvit_cli.errors import DataError
from uvit_cli.imageio import non_regular, read_regular
from uvit_cli.prepare.result import PrepareResult, Progress, ProgressFn
from uvit_cli.safe_pickle import load_numpy_pickle

IMAGENET_CLASSES = 1000  # datasets.py ImageNet256Features / ImageNet512Features: self.K = 1000
_ITEM = re.compile(r"^(\d+)\.npy$")
_CAPTION = re.compile(r"^(\d+)_(\d+)\.npy$")


def load_official_npy(path: Path, raw: bytes | None = None) -> Any:
    """`np.load(path, allow_pickle=True)` for the official files (or their bytes `raw`, already read),
    without running arbitrary pickled code."""
    try:
        f = io.BytesIO(read_regular(path) if raw is None else raw)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f)
        return load_numpy_pickle(f)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise DataError(f"{path}: not an official U-ViT feature file ({type(e).__name__}: {e})") from None


def _item_files(kind: str, d: Path, i: int, counts: list[int]) -> list[Path]:
    """The official files of item i: its moments, then (COCO) its captions' features in order."""
    return [d / f"{i}.npy", *(d / f"{i}_{j}.npy" for j in range(counts[i] if kind == "coco" else 0))]


def _read_files(paths: list[Path]) -> list[bytes]:
    try:
        return [read_regular(p) for p in paths]
    except ValueError as e:  # NotARegularFile: became a named pipe or the like since `_scan`
        raise DataError(f"{e}; the official features are files") from None


def _files_sha256(paths: list[Path], raws: list[bytes] | None = None) -> str:
    """What a shard records of one item (`ShardData.source_sha256`): the names and bytes of its files."""
    raws = raws if raws is not None else _read_files(paths)
    h = hashlib.sha256()
    for path, raw in zip(paths, raws, strict=True):
        h.update(path.name.encode() + b"\0")
        h.update(raw)
    return h.hexdigest()[:32]


def _scan(directory: Path) -> tuple[list[int], dict[int, list[int]]]:
    """Item indices and, per item, caption indices from the `<idx>.npy` / `<idx>_<k>.npy` names."""
    items: list[int] = []
    caps: dict[int, list[int]] = {}
    with os.scandir(directory) as it:
        for e in it:
            m, c = _ITEM.match(e.name), _CAPTION.match(e.name)
            if (m or c) and not e.is_file():  # a named pipe would block the read: refused unopened
                raise DataError(
                    f"{e.path}: {non_regular(e.path)}, not a regular file; move it out of {directory}"
                )
            if m:
                items.append(int(m[1]))
            elif c:
                caps.setdefault(int(c[1]), []).append(int(c[2]))
    return sorted(items), caps


def _check_contiguous(directory: Path, items: list[int], what: str) -> int:
    """The official readers index files 0..n-1 (ImageNet: __len__ is hard-coded): refuse gaps."""
    if not items:
        raise DataError(f"{directory}: no <idx>.npy {what} files")
    n = len(items)
    if items[-1] != n - 1 or items[0] != 0:
        have = set(items)
        missing = next(i for i in range(items[-1] + 1) if i not in have)
        raise DataError(f"{directory}: {what} files are not numbered 0..{n - 1} ({missing}.npy is missing)")
    return n


def _detect(src: Path) -> str:
    if (src / "empty_context.npy").is_file() or (src / "train").is_dir() or (src / "val").is_dir():
        return "coco"
    with os.scandir(src) as it:
        if any(_ITEM.match(e.name) for e in it):
            return "imagenet"
    raise DataError(
        f"{src}: not an official U-ViT feature directory (expected coco256_features/ with empty_context.npy "
        "and train/, val/, or imagenet256_features/ with <idx>.npy files)"
    )


def _moments(a: Any, path: Path) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3 or a.shape[0] != 8 or a.dtype.kind != "f":
        raise DataError(f"{path}: expected moments of shape (8, h, w), found {a.dtype} {a.shape}")
    return a.astype(np.float32, copy=False)


def import_official_features(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    kind: OfficialKind = "auto",
    dtype: str = "float16",
    items_per_shard: int = 1000,
    num_workers: int = 8,
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """Copy an official `coco256_features/` or `imagenet{256,512}_features/` directory into shards under the
    data root `out` (`out/coco256`, `out/imagenet256`, ...; see `config.set_dir`).

    Rerunning the same call resumes (finished shards are kept); an `--out` made otherwise is refused.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: directory not found")
    kind = _detect(src) if kind == "auto" else kind
    if kind == "coco":
        splits = [s for s in ("train", "val") if (src / s).is_dir()]
        if not splits:
            raise DataError(f"{src}: no train/ or val/ folder of COCO features")
        empty_path = src / "empty_context.npy"
        if not empty_path.is_file():
            raise DataError(
                f"{empty_path} not found: the CFG null condition (run scripts/extract_empty_feature.py)"
            )
        empty = np.asarray(load_official_npy(empty_path), dtype=np.float32)
        if empty.ndim != 2:
            raise DataError(f"{empty_path}: expected (77, D) CLIP features, found shape {empty.shape}")
        dirs = {s: src / s for s in splits}
    else:
        empty = None
        dirs = {"train": src}

    listings: dict[str, tuple[int, list[int]]] = {}  # split -> (items, captions per item)
    for split, d in dirs.items():
        items, caps = _scan(d)
        n = _check_contiguous(d, items, "feature")
        counts = []
        if kind == "coco":
            for i in range(n):
                ks = sorted(caps.get(i, []))
                if not ks or ks != list(range(len(ks))):
                    raise DataError(f"{d}: captions of item {i} are not {i}_0.npy .. {i}_<k>.npy ({ks[:5]})")
                counts.append(len(ks))
        listings[split] = (n, counts)

    first = load_official_npy(dirs[next(iter(dirs))] / "0.npy")
    shape = list(_moments(first if kind == "coco" else first[0], src).shape)
    settings = {
        "format_version": data.FORMAT_VERSION,
        "kind": kind,
        "space": "latent",
        "source": "official U-ViT feature files",
        "resolution": 8 * shape[1],
        "conditioning": "text" if kind == "coco" else "class",
        "dtype": dtype,
        "items_per_shard": items_per_shard,
    }
    what = "extract_mscoco_feature.py" if kind == "coco" else "extract_imagenet_feature.py"
    manifest = data.new_manifest(
        kind=kind,
        space="latent",
        conditioning=settings["conditioning"],
        shape=shape,
        views=1,
        dtype=dtype,
        items_per_shard=items_per_shard,
        settings=settings,
        num_classes=IMAGENET_CLASSES if kind == "imagenet" else None,
        context_shape=None if empty is None else empty.shape,
        preprocessing=f"imported from {src} (official U-ViT scripts/{what}); one item per file"
        + (", mirror images included as items" if kind == "imagenet" else ""),
    )
    out = set_dir(out, name or dataset_name(kind, settings["resolution"]))
    writer = data.ShardSetWriter(out, manifest)
    n_shards = {s: math.ceil(n / items_per_shard) for s, (n, _) in listings.items()}
    splits = {
        s: (hashlib.sha256(json.dumps([n, counts]).encode()).hexdigest()[:16], n_shards[s])
        for s, (n, counts) in listings.items()
    }
    writer.check_splits(splits)
    _require_resources(out, listings, items_per_shard, shape, empty, dtype)
    writer.begin(splits, empty)

    result = PrepareResult(out, writer.manifest)
    with ThreadPoolExecutor(max(1, num_workers)) as pool:  # file reads dominate; numpy releases the GIL
        for split, (n, counts) in listings.items():
            state = Progress(split, 0, n)
            now = _digests_now(pool, kind, dirs[split], n, counts, items_per_shard)
            todo = set(writer.todo(split, n_shards[split], now))
            for k in range(n_shards[split]):
                lo, hi = k * items_per_shard, min((k + 1) * items_per_shard, n)
                if k in todo:
                    writer.write(
                        split, k, _read_shard(pool, kind, dirs[split], lo, hi, counts, shape, empty, dtype)
                    )
                    state.shards_written += 1
                else:
                    state.shards_reused += 1
                state.done = hi
                if progress:
                    progress(state)
            result.written[split], result.reused[split] = state.shards_written, state.shards_reused
            writer.finish(split, n_shards[split])
    result.manifest = writer.manifest
    return result


def _require_resources(
    out: Path,
    listings: dict[str, tuple[int, list[int]]],
    items_per_shard: int,
    shape: list[int],
    empty: np.ndarray | None,
    dtype: str,
) -> None:
    """Refuse, before anything is written, a shard that cannot be held in memory (its items as read, stacked
    and stored) or shards that cannot fit on disk."""
    x, ctx = math.prod(shape), 0 if empty is None else empty.size  # values per item, per caption
    stored = 2 if dtype == "float16" else 4
    peak, disk = 0, 0
    for split, (n, counts) in listings.items():
        present = set(data.list_shards(out / split))
        for lo in range(0, n, items_per_shard):
            items = min(items_per_shard, n - lo)
            caps = sum(counts[lo : lo + items])
            peak = max(peak, items * x * (4 + 4 + stored) + caps * ctx * (4 + 4 + 2 * stored))
            if lo // items_per_shard not in present:
                disk += items * (x * stored + 16) + caps * ctx * stored
    resources.require_memory(
        f"importing {items_per_shard} items per shard", peak, fix="use a smaller --items-per-shard"
    )
    resources.require_disk(out, "the shards still to write", disk, fix="free space, or choose another --out")


def _digests_now(
    pool: ThreadPoolExecutor, kind: str, d: Path, n: int, counts: list[int], items_per_shard: int
) -> SourceDigests:
    """What the items of shard k hash to now, for `ShardSetWriter.todo` to compare with its record."""

    def digests(k: int) -> list[tuple[str, str]]:
        items = range(k * items_per_shard, min((k + 1) * items_per_shard, n))
        files = [_item_files(kind, d, i, counts) for i in items]
        return [(str(f[0]), h) for f, h in zip(files, pool.map(_files_sha256, files), strict=True)]

    return digests


def _read_shard(
    pool: ThreadPoolExecutor,
    kind: str,
    d: Path,
    lo: int,
    hi: int,
    counts: list[int],
    shape: list[int],
    empty: np.ndarray | None,
    dtype: str,
) -> data.ShardData:
    """Items lo..hi-1 of an official directory as one shard's contents."""

    def read(i: int) -> tuple[list[Any], str]:
        """Item i's files parsed, and the digest of the bytes that were parsed."""
        paths = _item_files(kind, d, i, counts)
        raws = _read_files(paths)
        digest = _files_sha256(paths, raws)
        return [load_official_npy(p, raw) for p, raw in zip(paths, raws, strict=True)], digest

    def coco_item(i: int) -> tuple[np.ndarray, np.ndarray, str]:
        (moments, *captions), digest = read(i)
        return _moments(moments, d / f"{i}.npy"), np.stack([np.asarray(c) for c in captions]), digest

    def imagenet_item(i: int) -> tuple[np.ndarray, int, str]:
        (obj,), digest = read(i)
        if not (isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == (2,)):
            raise DataError(f"{d / f'{i}.npy'}: expected a pickled (moments, label) pair")
        label = int(obj[1])
        if not 0 <= label < IMAGENET_CLASSES:
            raise DataError(f"{d / f'{i}.npy'}: label {label} outside 0..{IMAGENET_CLASSES - 1}")
        return _moments(obj[0], d / f"{i}.npy"), label, digest

    rows: list[tuple[Any, ...]] = list(
        pool.map(coco_item if kind == "coco" else imagenet_item, range(lo, hi))
    )
    xs = np.stack([r[0] for r in rows])  # (n, 8, h, w) float32
    if list(xs.shape[1:]) != shape:
        raise DataError(
            f"{d}: items {lo}..{hi - 1} hold moments of shape {xs.shape[1:]}, item 0 {tuple(shape)}"
        )
    contexts = None
    if kind == "coco":
        assert empty is not None
        contexts = [data.to_storage(np.asarray(r[1], np.float32), dtype) for r in rows]
        bad = next(
            (i for i, c in zip(range(lo, hi), contexts, strict=True) if c.shape[1:] != empty.shape), None
        )
        if bad is not None:
            raise DataError(f"{d}: the contexts of item {bad} are not {empty.shape} like empty_context.npy")
    return data.ShardData(
        x=data.to_storage(xs[:, None], dtype),  # (n, 1, 8, h, w)
        keys=[str(i) for i in range(lo, hi)],
        sources=hi - lo,
        y=np.array([r[1] for r in rows], np.int64) if kind == "imagenet" else None,
        contexts=contexts,
        source_sha256=[r[2] for r in rows],
    )
