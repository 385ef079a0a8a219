"""`FeatureDataset`: a prepared split, read a batch at a time by positioned reads into the batch's arrays."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from uvit_cli.data.check import REMAKE, check_files, npy_layout
from uvit_cli.data.format import EMPTY_CONTEXT, read_manifest, split_entry
from uvit_cli.data.seeds import choose, choose_many
from uvit_cli.errors import DataError

_PREADV = hasattr(os, "preadv")  # positioned reads without a shared file offset (not on Windows)


class _Rows:
    """A .npy file read row by row: `rows` along the first axis of its (rows, *row_shape) view."""

    def __init__(self, path: Path, row_ndim: int) -> None:
        shape, self.dtype, self.start = npy_layout(path)
        self.row_shape = tuple(shape[len(shape) - row_ndim :])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.path = path
        self.file = open(path, "rb", buffering=0)  # closed when the last reference goes

    def read_into(self, buf: memoryview, row: int) -> int:
        offset = self.start + row * self.row_bytes
        if _PREADV:
            return os.preadv(self.file.fileno(), [buf], offset)
        self.file.seek(offset)
        return self.file.readinto(buf) or 0


def _gather(out: np.ndarray, files: Sequence[_Rows], rows: Iterable[int]) -> None:
    """out[p] = row `rows[p]` of `files[p]`: one read per row, straight into the output array."""
    flat = memoryview(out).cast("B")
    n = out[0].nbytes if len(out) else 0
    for p, (f, r) in enumerate(zip(files, rows, strict=True)):
        if f.row_bytes != n:
            raise DataError(
                f"{f.path}: rows of {f.row_bytes} bytes, not {n} like the rest of the set; {REMAKE}"
            )
        if f.read_into(flat[p * n : (p + 1) * n], r) != n:
            raise DataError(f"{f.path}: row {r} is past the end of the file (truncated?); {REMAKE}")


class _Shard:
    """One open shard: `x` and `context` as row files, `y` and `context_offsets` (small) in memory."""

    def __init__(self, d: Path) -> None:
        try:
            self.x = _Rows(d / "x.npy", 3)
            self.context = _Rows(d / "context.npy", 2) if (d / "context.npy").exists() else None
            self.y = np.load(d / "y.npy") if (d / "y.npy").exists() else None
            offsets = d / "context_offsets.npy"
            self.offsets = np.load(offsets) if offsets.exists() else None
        except (OSError, ValueError) as e:
            raise DataError(f"{d}: cannot read shard ({e}); {REMAKE}") from None


_PIXELS = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0  # uint8 v -> v / 127.5 - 1, the model's pixels
_pixel_tables: dict[torch.device, torch.Tensor] = {}


def to_model(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A stored batch on `device` as the model takes it: uint8 pixels -> float32 in [-1, 1], float16
    features -> float32 (exact), labels unchanged. The copy moves the storage dtype, half (or a quarter)
    of the float32 bytes; pixels map through a 256-entry table computed once on the CPU, so every
    device gives the same bits."""
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if v.dtype == torch.uint8:
            if device not in _pixel_tables:
                _pixel_tables[device] = _PIXELS.to(device)
            v = _pixel_tables[device][v.long()]
        elif v.is_floating_point():
            v = v.float()
        out[k] = v
    return out


class FeatureDataset(Dataset):
    """A prepared split. `ds[i]` is a dict of float32 tensors (and int64 `y`):

    - `x`: moments (8, h, w) for latent sets, pixels (3, H, W) in [-1, 1] for pixel sets;
    - `y`: class index, for class-conditional sets;
    - `context`: (77, D) features of one caption, for text sets, chosen by `choose(seed, epoch, i)`.

    Items with two views (ImageNet: image and flip) count twice: item i is view i % 2 of image i // 2.
    `ds[(i, epoch)]` picks the caption for that epoch regardless of `set_epoch` (for samplers that
    yield pairs, e.g. with persistent DataLoader workers, which never see `set_epoch` on the parent).
    Shards are opened lazily, at most `max_open_shards` at a time per process; rows are read with one
    positioned read each (no memory map, so the resident memory is the batch, not the data set). The
    training loader fetches whole batches (`__getitems__`) in the storage dtype and converts them on the
    device (`to_model`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        seed: int = 0,
        max_open_shards: int = 64,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.seed = seed
        self.epoch = 0
        self.manifest = read_manifest(self.root)
        entry = split_entry(self.manifest, self.root, split)
        check_files(self.root, self.manifest, split)  # presence and sizes: cheap, names a damaged file
        self._shards = [s["name"] for s in entry["shards"] if s["count"] > 0]
        counts = np.array([s["count"] for s in entry["shards"] if s["count"] > 0], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_images = int(self._starts[-1])
        self.views = int(self.manifest["views"])
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._pid = os.getpid()
        self._empty: torch.Tensor | None = None
        if self.num_images == 0:
            raise DataError(f"{self.root}/{split}: the split holds no items")

    # -- properties the trainer uses ------------------------------------------------------------
    @property
    def space(self) -> str:
        return self.manifest["space"]

    @property
    def conditioning(self) -> str:
        return self.manifest["conditioning"]

    @property
    def num_classes(self) -> int:
        """K for class sets (labels 0..K-1), 0 otherwise."""
        return int(self.manifest.get("num_classes") or 0)

    @property
    def null_class(self) -> int:
        """The CFG null label: K (the model then has K + 1 label embeddings)."""
        return self.num_classes

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of `x`: moments (8, h, w) or pixels (3, H, W)."""
        return tuple(self.manifest["shape"])

    @property
    def z_shape(self) -> tuple[int, ...]:
        """Shape the diffusion model sees: (4, h, w) latents (half the moments' channels) or pixels."""
        c, *hw = self.shape
        return (c // 2, *hw) if self.space == "latent" else self.shape

    @property
    def empty_context(self) -> torch.Tensor:
        """CLIP("") as (77, D) float32: the null condition of text sets."""
        if self.conditioning != "text":
            raise DataError(f"{self.root}: not a text-conditional set, it has no empty context")
        if self._empty is None:
            path = self.root / EMPTY_CONTEXT
            if not path.exists():
                raise DataError(f"{path} not found; rerun uvit prepare")
            self._empty = torch.from_numpy(np.load(path).astype(np.float32))
        return self._empty

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_images * self.views

    # -- access ---------------------------------------------------------------------------------
    def _shard(self, s: int) -> _Shard:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own files
            self._open, self._pid = OrderedDict(), os.getpid()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        shard = _Shard(self.root / self.split / self._shards[s])
        self._open[s] = shard
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)  # closed once no batch in flight holds it
        return shard

    def _locate(self, image: int) -> tuple[int, int]:
        s = int(np.searchsorted(self._starts, image, side="right")) - 1
        return s, image - int(self._starts[s])

    def num_captions(self, i: int) -> int:
        s, j = self._locate(i // self.views)
        off = self._shard(s).offsets
        return int(off[j + 1] - off[j])

    def caption_index(self, i: int, epoch: int | None = None) -> int:
        """Which caption of item i `ds[i]` returns in `epoch` (default: the current one)."""
        return choose(self.seed, self.epoch if epoch is None else epoch, i, self.num_captions(i))

    def captions(self, i: int) -> list[str]:
        """The caption texts of item i (read from the shard's items.json; not for the training loop)."""
        s, j = self._locate(i // self.views)
        path = self.root / self.split / self._shards[s] / "items.json"
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise DataError(f"{path}: cannot read captions ({type(e).__name__}); {REMAKE}") from None
        return items.get("captions", [[]] * (j + 1))[j]

    def contexts(self, i: int) -> np.ndarray:
        """The stored features of every caption of item i, (n_captions, 77, D)."""
        s, j = self._locate(i // self.views)
        shard = self._shard(s)
        lo, hi = int(shard.offsets[j]), int(shard.offsets[j + 1])
        out = np.empty((hi - lo, *shard.context.row_shape), shard.context.dtype)
        _gather(out, [shard.context] * (hi - lo), range(lo, hi))
        return out

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> dict[str, torch.Tensor]:
        """A batch as stored: `x` uint8 pixels or float16/32 moments, `y` int64, `context` the float16/32
        features of each item's caption of the epoch. The DataLoader calls this with a whole batch of keys
        (ints, or `(index, epoch)` pairs); each row is one positioned read into the batch's array, and
        `to_model` converts on the device, so the model sees exactly the values `ds[i]` gives."""
        k = np.asarray(keys, dtype=np.int64).reshape(len(keys), -1)
        idx = k[:, 0]
        epochs = k[:, 1] if k.shape[1] == 2 else np.full(len(idx), self.epoch, dtype=np.int64)
        if len(idx) == 0:
            raise IndexError("an empty batch of keys")
        if idx.min() < 0 or idx.max() >= len(self):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise IndexError(f"index {bad} out of range for {len(self)} items")
        image, view = np.divmod(idx, self.views)
        shard = np.searchsorted(self._starts, image, side="right") - 1
        row = image - self._starts[shard]
        opened = {int(s): self._shard(int(s)) for s in np.unique(shard)}  # held until the batch is read
        per_item = [opened[s] for s in shard.tolist()]
        first = per_item[0]
        out = {"x": np.empty((len(idx), *self.shape), first.x.dtype)}
        _gather(out["x"], [sh.x for sh in per_item], (row * self.views + view).tolist())
        if first.y is not None:
            out["y"] = np.empty(len(idx), np.int64)
        if first.context is not None:
            lo, count = np.empty_like(row), np.empty_like(row)
        for s, sh in opened.items():
            at = shard == s
            if "y" in out:
                out["y"][at] = sh.y[row[at]]
            if first.context is not None:
                lo[at] = sh.offsets[row[at]]
                count[at] = sh.offsets[row[at] + 1] - lo[at]
        if first.context is not None:
            caption = lo + choose_many(self.seed, epochs, idx, count)
            out["context"] = np.empty((len(idx), *first.context.row_shape), first.context.dtype)
            _gather(out["context"], [sh.context for sh in per_item], caption.tolist())
        return {name: torch.from_numpy(v) for name, v in out.items()}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Item `key` as the model sees it (float32 `x` and `context`, int64 `y`)."""
        return {k: v[0] for k, v in to_model(self.__getitems__([key]), torch.device("cpu")).items()}

    def __getstate__(self) -> dict[str, Any]:
        # Files are reopened in each DataLoader worker rather than pickled.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state
