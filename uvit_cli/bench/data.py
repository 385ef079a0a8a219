"""`uvit bench data`: the loader `uvit train` builds against the official reader, on the same items, in one run.

Both read the same samples. Ours is the preset's training loader (`FeatureDataset` + `ResumableSampler` +
`make_loader`, the preset's worker count and pinning) over shards; the official one is U-ViT's
`datasets.py` reader over its own layout, as its train scripts use it (shuffle, drop_last, the same worker
count, default collate):

    COCO (text)        <i>.npy moments and <i>_<k>.npy contexts, float32; one caption file per item,
                       `random.randint` over the item's captions; CFG drop to empty_context
    ImageNet (class)   <i>.npy pickled (moments, label) per view, read with the numpy-only unpickler
                       (the cost of `np.load(allow_pickle=True)`, no code run); CFG drop to label K
    pixel sets         uint8 images in memory, as torchvision's CIFAR10: PIL image, random flip,
                       ToTensor, Normalize(0.5, 0.5)

The items are random data of the preset's real shapes in a temporary folder, or the first items of a
prepared folder (`data_dir`) with the official layout written beside them. Cold-cache rows drop both
layouts' files from the page cache with `posix_fadvise(DONTNEED)` before each run (no root needed); where
the platform lacks it, only warm rows are measured. The time is from the first batch requested after
`warmup` batches to the last one received, as stored (our batches stay float16/uint8 until the device).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from uvit_cli.bench.measure import Measurement, Timing
from uvit_cli.config import Preset
from uvit_cli.errors import ConfigError
from uvit_cli.workers import worker_loader

CONTEXT_LEN = 77
CAPTIONS = 5  # COCO has 5 (a few images 6 or 7) captions per image


# --------------------------------------------------------------------------------------------------
# The official readers (U-ViT datasets.py), over the official layout


class _OfficialCoco(Dataset):
    """`MSCOCOFeatureDataset` wrapped in `CFGDataset`: per item one moments file and one caption file."""

    def __init__(self, root: Path, n: int, n_captions: list[int], empty: np.ndarray, p_uncond: float) -> None:
        self.root, self.n, self.n_captions, self.empty, self.p_uncond = root, n, n_captions, empty, p_uncond

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        z = np.load(self.root / f"{i}.npy")
        k = random.randint(0, self.n_captions[i] - 1)
        c = np.load(self.root / f"{i}_{k}.npy")
        if random.random() < self.p_uncond:
            c = self.empty
        return z, c


class _OfficialImagenet(Dataset):
    """`FeatureDataset` (one pickled (moments, label) file per view) wrapped in `CFGDataset`."""

    def __init__(self, root: Path, n: int, null_label: int, p_uncond: float) -> None:
        self.root, self.n, self.null_label, self.p_uncond = root, n, null_label, p_uncond

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        from uvit_cli.prepare.official import load_official_npy

        z, label = load_official_npy(self.root / f"{i}.npy")
        if random.random() < self.p_uncond:
            label = self.null_label
        return z, label


class _OfficialPixels(Dataset):
    """torchvision's CIFAR10 over an in-memory uint8 array, with the official train transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, flip: bool) -> None:
        self.images, self.labels, self.flip = images, labels, flip  # images (n, H, W, 3)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img = Image.fromarray(self.images[i])
        if self.flip and random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
        x = (x - 0.5) / 0.5  # Normalize(0.5, 0.5)
        return x, int(self.labels[i]) if self.labels is not None else 0


# --------------------------------------------------------------------------------------------------
# The items: random data of the preset's shapes, or the first items of a prepared folder


def _items(preset: Preset, data_dir: Path | None, n_samples: int, seed: int = 0) -> dict[str, Any]:
    """Items in storage form: x (n, V, C, h, w), y (n,) or None, contexts [(k, 77, D)] or None, empty."""
    if data_dir is not None:
        from uvit_cli.data import FeatureDataset

        ds = FeatureDataset(data_dir, "train")
        n = min(ds.num_images, -(-n_samples // ds.views))
        keys = [i * ds.views + v for i in range(n) for v in range(ds.views)]
        b = ds.__getitems__(keys)
        x = b["x"].numpy().reshape(n, ds.views, *ds.shape)
        contexts = None
        if "context" in b:  # every caption of each item, read from its shard
            contexts = [ds.contexts(i) for i in range(n)]
        y = b["y"].numpy()[:: ds.views] if "y" in b else None
        empty = ds.empty_context.numpy().astype(np.float16) if contexts is not None else None
        return {"x": x, "y": y, "contexts": contexts, "empty": empty, "space": ds.space,
                "num_classes": ds.num_classes or None}  # fmt: skip
    m, d = preset.model, preset.data
    rng = np.random.default_rng(seed)
    views = 2 if d.kind == "imagenet" and d.space == "latent" else 1
    n = -(-n_samples // views)
    if d.space == "pixel":
        x = rng.integers(0, 256, (n, 1, 3, d.resolution, d.resolution), dtype=np.uint8)
    else:
        side = d.resolution // 8
        x = rng.standard_normal((n, views, 8, side, side), dtype=np.float32).astype(np.float16)
    y = contexts = empty = None
    num_classes = None
    if m.conditioning == "class":
        num_classes = m.num_classes - 1 if preset.train.p_uncond > 0 else m.num_classes
        y = rng.integers(0, num_classes, n)
    elif m.conditioning == "text":
        block = rng.standard_normal((64, CONTEXT_LEN, m.clip_dim), dtype=np.float32).astype(np.float16)
        contexts = [block[(5 * i + np.arange(CAPTIONS)) % 64] for i in range(n)]  # values do not matter
        empty = block[0]
    return {
        "x": x,
        "y": y,
        "contexts": contexts,
        "empty": empty,
        "space": d.space,
        "num_classes": num_classes,
    }


def _write_ours(items: dict[str, Any], root: Path) -> None:
    from uvit_cli.data import write_arrays

    x = items["x"] if items["space"] == "latent" else items["x"][:, 0]
    write_arrays(root, x, kind="bench", space=items["space"], y=items["y"], num_classes=items["num_classes"],
                 contexts=items["contexts"], empty_context=items["empty"], dtype="float16")  # fmt: skip


def _write_official(items: dict[str, Any], root: Path) -> Callable[[float], Dataset]:
    """Write the official layout of `items` under `root`; return a maker of the official reader."""
    root.mkdir(parents=True, exist_ok=True)
    x, y, contexts = items["x"], items["y"], items["contexts"]
    if items["space"] == "pixel":
        images = np.ascontiguousarray(x[:, 0].transpose(0, 2, 3, 1))
        return lambda p_uncond: _OfficialPixels(images, y, flip=True)
    if contexts is not None:
        for i in range(len(x)):
            np.save(root / f"{i}.npy", x[i, 0].astype(np.float32))
            for k, c in enumerate(contexts[i]):
                np.save(root / f"{i}_{k}.npy", c.astype(np.float32))
        np.save(root / "empty_context.npy", items["empty"].astype(np.float32))
        n_caps, empty = [len(c) for c in contexts], items["empty"].astype(np.float32)
        return lambda p_uncond: _OfficialCoco(root, len(x), n_caps, empty, p_uncond)
    # ImageNet: batches of originals then flips, one pickled (moments, label) object array per view
    views = x.shape[1]
    for i in range(len(x)):
        for v in range(views):
            pair = np.array(
                [x[i, v].astype(np.float32), np.int64(y[i] if y is not None else 0)], dtype=object
            )
            np.save(root / f"{i * views + v}.npy", pair, allow_pickle=True)
    null = items["num_classes"] or 0
    return lambda p_uncond: _OfficialImagenet(root, len(x) * views, null, p_uncond)


# --------------------------------------------------------------------------------------------------
# Timing


def _warm(*roots: Path) -> None:
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    while f.read(1 << 24):
                        pass


def _drop_cache(*roots: Path) -> None:
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _time(loader: DataLoader, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per batch over `steps` batches, seconds of worker start-up and the `warmup` batches before)."""
    t0 = time.perf_counter()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t1 = time.perf_counter()
    for _ in range(steps):
        next(it)
    sec = (time.perf_counter() - t1) / steps
    del it
    return sec, t1 - t0


def bench_data(
    preset: Preset,
    *,
    batch: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    workers: list[int] | None = None,
    cold: bool = True,
    timing: Timing | None = None,
) -> list[Measurement]:
    """Samples/s of our training loader and of the official reader on the same items, per worker count
    (default: 0, 2 and the preset's `train.num_workers`) and page-cache state; `timing.on_row` gets each
    row as soon as it is measured. Batches are pinned when `timing.device` is a GPU."""
    from uvit_cli.data import FeatureDataset, ResumableSampler, make_loader

    t = timing or Timing.of("data")
    steps, warmup, say = t.steps, t.warmup, t.say
    tc = preset.train
    batch = batch or tc.batch_size
    workers = workers if workers is not None else sorted({0, 2, tc.num_workers})  # in-process vs processes
    pin = t.device.type == "cuda"
    can_drop = hasattr(os, "posix_fadvise")
    n_samples = batch * (steps + warmup)
    out: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="uvit-bench-data-") as tmp:
        say("writing the items")
        items = _items(preset, Path(data_dir) if data_dir else None, n_samples)
        if data_dir is not None:
            ours_root = Path(data_dir)
        else:
            ours_root = Path(tmp) / "uvit"
            _write_ours(items, ours_root)
        official_root = Path(tmp) / "official"
        official = _write_official(items, official_root)
        n = len(official(0.0))  # the same samples for both: ours reads its first n
        if n < n_samples:
            raise ConfigError(
                f"{ours_root}: {n} items, fewer than the {n_samples} this run reads "
                f"({steps} + {warmup} batches of {batch}); pass a smaller --batch or --repeats"
            )
        in_memory = items["space"] == "pixel"  # the official pixel reader holds its images in memory
        del items
        for cache in ("warm", "cold") if cold and can_drop else ("warm",):
            for w in workers:
                note = f"workers {w}, {cache} cache"
                for recipe in ("official", "uvit"):
                    say(f"{recipe} reader, {note}")
                    random.seed(0)
                    if recipe == "official":
                        ods = official(tc.p_uncond)
                        loader = worker_loader(ods, batch_size=batch, shuffle=True, drop_last=True,
                                               num_workers=w, pin_memory=pin, persistent_workers=w > 0)  # fmt: skip
                    else:
                        ds = FeatureDataset(ours_root, "train", seed=tc.seed)
                        sampler = ResumableSampler(n, batch, seed=tc.seed, with_epoch=True)
                        loader = make_loader(ds, sampler, batch, w, pin_memory=pin)
                    if cache == "cold":
                        _drop_cache(ours_root, official_root)
                    elif recipe == "uvit" and data_dir is not None:
                        _time(loader, steps, warmup)  # one pass: the real folder may be far larger than n
                    else:
                        _warm(ours_root if recipe == "uvit" else official_root)
                    sec, warmup_s = _time(loader, steps, warmup)
                    extra = ", items in memory" if recipe == "official" and in_memory else ""
                    row = Measurement.from_timing("data", recipe, batch, sec, None, None, torch.device("cpu"),
                                                  note + extra, warmup_s)  # fmt: skip
                    t.add(out, row)
                    del loader
    return out
