"""CIFAR-10 and CelebA in their distributed formats: the sources of the pixel-space sets (spec §5.4).

    <root>/cifar-10-batches-py/       cifar-10-python.tar.gz extracted
        data_batch_1 .. data_batch_5  pickles {b"data": (10000, 3072) uint8, b"labels": [10000 ints]};
        test_batch, batches.meta      a row is the R, G, B planes of a 32x32 image, each row-major
    <root>/img_align_celeba/          img_align_celeba.zip extracted: 000001.jpg .. 202599.jpg, 178x218
    <root>/list_eval_partition.txt    optional: "000001.jpg 0" per line (0 train, 1 val, 2 test)
    (or both under <root>/celeba/, where torchvision's CelebA(root) keeps them)

CIFAR-10 rows go to the prepare engine as in-memory images (`Source.pixels`); CelebA's JPEGs are decoded
in its DataLoader workers where they are.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from uvit_cli.errors import DataError
from uvit_cli.imageio import NotARegularFile, non_regular, read_regular
from uvit_cli.prepare.sources import Source, read_text
from uvit_cli.safe_pickle import load_numpy_pickle

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
# The order of batches.meta's label_names (label k is CIFAR10_CLASSES[k]); used if the file is absent.
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CELEBA_SPLITS = {"0": "train", "1": "val", "2": "test"}  # list_eval_partition.txt codes


# --------------------------------------------------------------------------------------------------
# CIFAR-10


def cifar10_dir(root: str | os.PathLike[str]) -> Path:
    """`<root>/cifar-10-batches-py`, or root itself when it holds the batches."""
    root = Path(root)
    for d in (root / CIFAR10_DIR, root):
        if (d / "data_batch_1").is_file() or (d / "test_batch").is_file():
            return d
    if not root.is_dir():
        raise DataError(f"{root}: directory not found")
    raise DataError(
        f"{root}: no {CIFAR10_DIR}/data_batch_1 (extract cifar-10-python.tar.gz, the python version, there)"
    )


def _unpickle(path: Path) -> Any:
    try:
        raw = read_regular(path)
    except NotARegularFile as e:
        raise DataError(f"{e}; a CIFAR-10 batch must be a file") from None
    except FileNotFoundError:
        raise DataError(f"{path}: CIFAR-10 batch not found (extract all of cifar-10-python.tar.gz)") from None
    try:
        # The files are Python 2 pickles: latin1 is how numpy arrays in them load (as torchvision does).
        return load_numpy_pickle(io.BytesIO(raw), encoding="latin1")
    except Exception as e:  # truncated download, another file under that name
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None


def _field(d: Any, name: str) -> Any:
    """Python 2 pickles give str keys under latin1, Python 3 ones bytes keys (b"data", as the docs show)."""
    if isinstance(d, dict):
        for k in (name, name.encode()):
            if k in d:
                return d[k]
    return None


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (n, 32, 32, 3) uint8 HWC images, (n,) int64 labels."""
    d = _unpickle(path)
    rows, labels = _field(d, "data"), _field(d, "labels")
    rows = np.asarray(rows) if rows is not None else None
    if rows is None or labels is None or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
        raise DataError(f"{path}: not a CIFAR-10 python batch (expected data (n, 3072) uint8 and labels)")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(rows),) or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
        raise DataError(f"{path}: {labels.size} labels for {len(rows)} images, or labels outside 0..9")
    # Row: 1024 R, then 1024 G, then 1024 B values, each plane row-major (the dataset's README).
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def cifar10_classes(root: str | os.PathLike[str]) -> list[str]:
    """Class names from batches.meta (label_names), else the published list."""
    meta = cifar10_dir(root) / "batches.meta"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    names = _field(_unpickle(meta), "label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"{meta}: expected label_names, a list of 10 class names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def cifar10_sources(root: str | os.PathLike[str], split: str) -> list[Source]:
    """The split's images in batch order (train: data_batch_1..5 = 50,000; test: test_batch = 10,000),
    decoded in memory (~150 MB for train); keys are `<batch>/<row>`."""
    batches = cifar10_dir(root)
    sources = []
    for name in CIFAR10_BATCHES[split]:
        images, labels = read_cifar10_batch(batches / name)
        for j, (img, label) in enumerate(zip(images, labels, strict=True)):
            sources.append(Source(f"{name}/{j}", f"{batches / name}#{j}", label=int(label), pixels=img))
    return sources


# --------------------------------------------------------------------------------------------------
# CelebA


def _celeba_source(images: Path, name: str) -> Source:
    """One aligned image; an entry that is not a regular file is listed to be skipped unopened."""
    return Source(name, str(images / name), skip=non_regular(images / name))


def celeba_sources(root: str | os.PathLike[str]) -> dict[str, list[Source]]:
    """`img_align_celeba/*.jpg` sorted by name: all as train, or the splits of list_eval_partition.txt."""
    root = Path(root)
    if not (root / "img_align_celeba").is_dir() and (root / "celeba" / "img_align_celeba").is_dir():
        root = root / "celeba"  # the root U-ViT passes to torchvision's CelebA, which adds "celeba/"
    images = root / "img_align_celeba"
    if not images.is_dir():
        raise DataError(f"{images}: CelebA image folder not found (extract img_align_celeba.zip in {root})")
    names = sorted(p.name for p in images.iterdir() if p.suffix.lower() == ".jpg" and p.name[0] != ".")
    if not names:
        raise DataError(f"{images}: no .jpg images")
    partition = root / "list_eval_partition.txt"
    if not os.path.lexists(partition):
        return {"train": [_celeba_source(images, n) for n in names]}

    split_of: dict[str, str] = {}
    for n, line in enumerate(read_text(partition, "CelebA partition list").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in CELEBA_SPLITS:
            raise DataError(f"{partition}:{n}: expected '<image>.jpg <0|1|2>', got {line.strip()!r}")
        split_of[parts[0]] = CELEBA_SPLITS[parts[1]]
    present = set(names)
    missing = sorted(f for f in split_of if f not in present)
    if missing:
        raise DataError(
            f"{partition} lists {len(missing)} images missing from {images} (first: {missing[0]}); "
            "extract all of img_align_celeba.zip, or remove the partition file to use every image as train"
        )
    out: dict[str, list[Source]] = {}
    for split in CELEBA_SPLITS.values():
        sources = [_celeba_source(images, f) for f in sorted(split_of) if split_of[f] == split]
        if sources:
            out[split] = sources
    return out
