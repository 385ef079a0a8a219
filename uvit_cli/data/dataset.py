"""`FeatureDataset`: a prepared split, memory-mapped shard by shard."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from uvit_cli.data.check import check_files
from uvit_cli.data.format import EMPTY_CONTEXT, read_manifest, split_entry
from uvit_cli.data.seeds import choose
from uvit_cli.errors import DataError


class FeatureDataset(Dataset):
    """A prepared split. `ds[i]` is a dict of float32 tensors (and int64 `y`):

    - `x`: moments (8, h, w) for latent sets, pixels (3, H, W) in [-1, 1] for pixel sets;
    - `y`: class index, for class-conditional sets;
    - `context`: (77, D) features of one caption, for text sets, chosen by `choose(seed, epoch, i)`.

    Items with two views (ImageNet: image and flip) count twice: item i is view i % 2 of image i // 2.
    `ds[(i, epoch)]` picks the caption for that epoch regardless of `set_epoch` (for samplers that
    yield pairs, e.g. with persistent DataLoader workers, which never see `set_epoch` on the parent).
    Shards are memory-mapped lazily, at most `max_open_shards` at a time per process.
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
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
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
    def _arrays(self, s: int) -> dict[str, np.ndarray]:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        d = self.root / self.split / self._shards[s]
        try:
            arrs = {p.stem: np.load(p, mmap_mode="r") for p in d.glob("*.npy")}
        except (OSError, ValueError) as e:
            raise DataError(f"{d}: cannot read shard ({e}); re-run uvit prepare") from None
        self._open[s] = arrs
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return arrs

    def _locate(self, image: int) -> tuple[int, int]:
        s = int(np.searchsorted(self._starts, image, side="right")) - 1
        return s, image - int(self._starts[s])

    def num_captions(self, i: int) -> int:
        s, j = self._locate(i // self.views)
        off = self._arrays(s)["context_offsets"]
        return int(off[j + 1] - off[j])

    def caption_index(self, i: int, epoch: int | None = None) -> int:
        """Which caption of item i `ds[i]` returns in `epoch` (default: the current one)."""
        return choose(self.seed, self.epoch if epoch is None else epoch, i, self.num_captions(i))

    def captions(self, i: int) -> list[str]:
        """The caption texts of item i (read from the shard's items.json; not for the training loop)."""
        s, j = self._locate(i // self.views)
        items = json.loads((self.root / self.split / self._shards[s] / "items.json").read_text())
        return items.get("captions", [[]] * (j + 1))[j]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        i, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.epoch)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        image, view = divmod(i, self.views)
        s, j = self._locate(image)
        a = self._arrays(s)
        x = a["x"][j, view]
        if x.dtype == np.uint8:
            xt = torch.from_numpy(x.astype(np.float32)) / 127.5 - 1.0
        else:
            xt = torch.from_numpy(np.array(x, dtype=np.float32))
        out = {"x": xt}
        if "y" in a:
            out["y"] = torch.tensor(int(a["y"][j]), dtype=torch.int64)
        if "context" in a:
            lo, hi = int(a["context_offsets"][j]), int(a["context_offsets"][j + 1])
            k = choose(self.seed, epoch, i, hi - lo)
            out["context"] = torch.from_numpy(np.array(a["context"][lo + k], dtype=np.float32))
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened in each DataLoader worker rather than pickled.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state
