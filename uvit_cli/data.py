"""Feature shards: the on-disk format that `uvit prepare` writes and the `FeatureDataset` the trainer reads.

    OUT/manifest.json                 what the set is (see `new_manifest`); written atomically
    OUT/empty_context.npy             text sets: CLIP("") as (77, D) float32, the CFG null condition
    OUT/<split>/shard-00000/          one directory per shard; it appears (rename) only when complete
        x.npy                (n, V, C, h, w)  moments (float16 by default) or pixels (uint8, CHW)
                                              V views per item: 1, or 2 = the item and its horizontal flip
        y.npy                (n,) int64        class sets
        context.npy          (m, 77, D)        text sets: every caption of every item, flat
        context_offsets.npy  (n + 1,) int64    captions of item j are context[off[j]:off[j + 1]]
        items.json           {"keys": [...], "captions": [[...], ...]}  source of each item
        meta.json            fingerprint, counts, sha256 of every file, skipped sources; written last

Shard k of a split covers source items [k * items_per_shard, (k + 1) * items_per_shard) of the sorted
source list, so its contents do not depend on the number of GPUs; skipped (corrupt) sources make a
shard shorter. Every file loads with `np.load(mmap_mode="r")`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from uvit_cli.errors import DataError
from uvit_cli.fileio import save_npy_atomic, sha256_file, write_json_atomic

FORMAT = "uvit-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMPTY_CONTEXT = "empty_context.npy"
SHARD_META = "meta.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})$")
FP16_MAX = 65504.0


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable digest of everything that determines shard contents."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def to_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """Cast float32 features to the storage dtype, refusing values float16 cannot hold."""
    if dtype == "float16":
        if a.size and not np.isfinite(a).all():
            raise DataError(
                "encoder output has NaN or inf values; check the weights (or use --dtype float32)"
            )
        if a.size and float(np.abs(a).max()) > FP16_MAX:
            raise DataError(
                f"feature values exceed the float16 range ({FP16_MAX}); rerun with --dtype float32"
            )
        return a.astype(np.float16)
    if dtype == "float32":
        return a.astype(np.float32)
    raise DataError(f"unknown storage dtype {dtype!r} (float16 or float32)")


# --------------------------------------------------------------------------------------------------
# Writing


@dataclass
class ShardData:
    """The contents of one shard, arrays already in their storage dtype."""

    x: np.ndarray  # (n, V, C, h, w)
    keys: list[str]
    sources: int  # number of source items the shard covers (n + skipped)
    y: np.ndarray | None = None  # (n,) int64
    contexts: list[np.ndarray] | None = None  # per item (n_captions, 77, D)
    captions: list[list[str]] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"key", "reason"}


def write_shard(split_dir: Path, index: int, data: ShardData, fp: str) -> dict[str, Any]:
    """Write shard `index` under a temporary name, then rename it into place; returns its meta."""
    n = len(data.keys)
    if data.x.shape[0] != n:
        raise ValueError(f"x has {data.x.shape[0]} rows for {n} keys")
    arrays: dict[str, np.ndarray] = {"x.npy": np.ascontiguousarray(data.x)}
    if data.y is not None:
        arrays["y.npy"] = np.asarray(data.y, dtype=np.int64)
    n_captions = 0
    if data.contexts is not None:
        counts = np.array([c.shape[0] for c in data.contexts], dtype=np.int64)
        arrays["context_offsets.npy"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if data.contexts:  # an all-skipped shard has offsets [0] and no context array
            arrays["context.npy"] = np.ascontiguousarray(np.concatenate(data.contexts, axis=0))
        n_captions = int(counts.sum())

    final = split_dir / shard_name(index)
    tmp = split_dir / f".tmp-{shard_name(index)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, arr in arrays.items():
            with open(tmp / name, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
        items: dict[str, Any] = {"keys": data.keys}
        if data.captions is not None:
            items["captions"] = data.captions
        (tmp / "items.json").write_text(json.dumps(items))
        files = sorted([*arrays, "items.json"])
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": fp,
            "index": index,
            "count": n,
            "sources": data.sources,
            "captions": n_captions,
            "skipped": data.skipped,
            "sha256": {name: sha256_file(tmp / name) for name in files},
        }
        write_json_atomic(tmp / SHARD_META, meta)
    except BaseException:
        # Interrupted (Ctrl-C, full disk): drop the partial shard. A hard kill leaves the temporary,
        # which `remove_temporaries` deletes at the next start; it is never read as a shard.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process finished the same shard first (or a stale copy exists): keep the existing one.
        shutil.rmtree(tmp, ignore_errors=True)
        existing = read_shard_meta(split_dir, index)
        if existing is None:
            raise DataError(f"{final}: cannot move the finished shard into place") from None
        return existing
    return meta


def read_shard_meta(split_dir: Path, index: int) -> dict[str, Any] | None:
    """The meta of a finished shard, or None if it does not exist (a directory without meta is not a shard)."""
    path = split_dir / shard_name(index) / SHARD_META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(
            f"{path}: unreadable shard meta ({e}); delete that shard directory and rerun"
        ) from None


def list_shards(split_dir: Path) -> list[int]:
    if not split_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in split_dir.iterdir() if (m := _SHARD_RE.match(p.name)))


def remove_temporaries(split_dir: Path) -> int:
    """Delete `.tmp-*` leftovers of interrupted runs; call before any writer starts."""
    n = 0
    if split_dir.is_dir():
        for p in split_dir.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Manifest


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found: prepare the data first (uvit prepare ... --out {root})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    if m.get("format") != FORMAT:
        raise DataError(f"{path}: not a uvit shard manifest")
    if m.get("version", 0) > FORMAT_VERSION:
        raise DataError(f"{path}: shard format version {m['version']} is newer than this uvit understands")
    return m


def split_summary(shard_metas: list[dict[str, Any]], source_digest: str) -> dict[str, Any]:
    """The manifest entry of a finished split, assembled from its shards' metas."""
    metas = sorted(shard_metas, key=lambda m: m["index"])
    return {
        "complete": True,
        "source_digest": source_digest,
        "sources": sum(m["sources"] for m in metas),
        "items": sum(m["count"] for m in metas),
        "captions": sum(m["captions"] for m in metas),
        "shards": [
            {
                "name": shard_name(m["index"]),
                "count": m["count"],
                "captions": m["captions"],
                "sha256": m["sha256"],
            }
            for m in metas
        ],
        "skipped": [s for m in metas for s in m["skipped"]],
    }


def new_manifest(
    *,
    kind: str,
    space: str,
    conditioning: str,
    shape: Sequence[int],
    views: int,
    dtype: str,
    items_per_shard: int,
    settings: dict[str, Any],
    num_classes: int | None = None,
    classes: list[str] | None = None,
    context_shape: Sequence[int] | None = None,
    encoders: dict[str, Any] | None = None,
    preprocessing: str = "",
) -> dict[str, Any]:
    """The manifest of a shard set; `settings` (all that determines contents) is fingerprinted."""
    from uvit_cli import __version__

    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created_by": f"uvit {__version__}",
        "kind": kind,
        "space": space,
        "conditioning": conditioning,
        "shape": list(shape),
        "views": views,
        "dtype": dtype,
        "num_classes": num_classes,
        "classes": classes,
        "context_shape": list(context_shape) if context_shape else None,
        "context_dtype": dtype if context_shape else None,
        "empty_context": EMPTY_CONTEXT if conditioning == "text" else None,
        "items_per_shard": items_per_shard,
        "preprocessing": preprocessing,
        "encoders": encoders or {},
        "settings": settings,
        "fingerprint": fingerprint(settings),
        "splits": {},
    }


def write_arrays(
    root: str | os.PathLike[str],
    x: np.ndarray,
    *,
    split: str = "train",
    kind: str = "arrays",
    space: str = "pixel",
    y: np.ndarray | None = None,
    num_classes: int | None = None,
    contexts: list[np.ndarray] | None = None,
    empty_context: np.ndarray | None = None,
    items_per_shard: int = 1000,
    dtype: str = "float16",
) -> Path:
    """Write in-memory data as a complete shard set (tests, small custom sets).

    `x`: (n, 3, H, W) uint8 pixels for `space="pixel"`, or (n, [V,] 8, h, w) float moments for "latent";
    `y`: (n,) labels; `contexts`: per item a (n_captions, 77, D) float array, with `empty_context` (77, D).
    """
    root = Path(root)
    x = np.asarray(x)
    if space == "pixel" and x.dtype != np.uint8:
        raise DataError("pixel sets are stored as uint8 (n, 3, H, W)")
    if x.ndim == 4:
        x = x[:, None]
    if contexts is not None and empty_context is None:
        raise DataError("a text set needs its empty context (CLIP of the empty string)")
    conditioning = "text" if contexts is not None else "class" if y is not None else "none"
    if conditioning == "class" and num_classes is None:
        num_classes = int(np.max(y)) + 1
    settings = {"kind": kind, "space": space, "dtype": dtype, "items_per_shard": items_per_shard}
    manifest = new_manifest(
        kind=kind,
        space=space,
        conditioning=conditioning,
        shape=x.shape[2:],
        views=x.shape[1],
        dtype="uint8" if space == "pixel" else dtype,
        items_per_shard=items_per_shard,
        settings=settings,
        num_classes=num_classes if conditioning == "class" else None,
        context_shape=empty_context.shape if empty_context is not None else None,
    )
    if (root / MANIFEST).exists():
        manifest = read_manifest(root)
        if manifest["fingerprint"] != fingerprint(settings):
            raise DataError(f"{root} holds shards made with other settings")
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    if empty_context is not None:
        save_npy_atomic(root / EMPTY_CONTEXT, np.asarray(empty_context, dtype=np.float32))
    metas = []
    n = x.shape[0]
    for k, lo in enumerate(range(0, n, items_per_shard)):
        hi = min(lo + items_per_shard, n)
        data = ShardData(
            x=x[lo:hi] if space == "pixel" else to_storage(x[lo:hi].astype(np.float32), dtype),
            keys=[str(i) for i in range(lo, hi)],
            sources=hi - lo,
            y=None if y is None else np.asarray(y[lo:hi], dtype=np.int64),
            contexts=None
            if contexts is None
            else [to_storage(np.asarray(c, np.float32), dtype) for c in contexts[lo:hi]],
        )
        metas.append(write_shard(split_dir, k, data, manifest["fingerprint"]))
    manifest["splits"][split] = split_summary(metas, source_digest="")
    write_json_atomic(root / MANIFEST, manifest)
    return root


def verify(root: str | os.PathLike[str], split: str = "train") -> int:
    """Recompute every file's sha256 against the manifest; returns the number of files checked."""
    root = Path(root)
    entry = _split_entry(read_manifest(root), root, split)
    n = 0
    for shard in entry["shards"]:
        for name, digest in shard["sha256"].items():
            path = root / split / shard["name"] / name
            if not path.exists() or sha256_file(path) != digest:
                raise DataError(f"{path}: missing or modified (sha256 mismatch); re-run uvit prepare")
            n += 1
    return n


def _split_entry(manifest: dict[str, Any], root: Path, split: str) -> dict[str, Any]:
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        have = ", ".join(manifest.get("splits", {})) or "none"
        raise DataError(f"{root}: no '{split}' split (prepared: {have})")
    if not entry.get("complete"):
        raise DataError(f"{root}: the '{split}' split is incomplete; rerun the same uvit prepare command")
    return entry


# --------------------------------------------------------------------------------------------------
# Reading


_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def choose(seed: int, epoch: int, index: int, n: int) -> int:
    """A deterministic pick in [0, n) from (seed, epoch, index): no RNG state, same on every rank."""
    h = _splitmix64(seed & _M64)
    h = _splitmix64(h ^ (epoch & _M64))
    h = _splitmix64(h ^ (index & _M64))
    return h % n


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
        entry = _split_entry(self.manifest, self.root, split)
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


class ResumableSampler(Sampler):
    """This rank's share of a seeded global permutation, cut into global batches.

    Global batch b of epoch e is `perm_e[b * B:(b + 1) * B]` (B = global batch size) whatever the number of
    ranks; rank r gets its contiguous 1/world slice. The tail that does not fill a global batch is dropped.
    `start_batch` skips batches already trained on, so a resumed run sees exactly the same data.
    With `with_epoch`, yields `(index, epoch)` pairs (see FeatureDataset).
    """

    def __init__(
        self,
        length: int,
        global_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        with_epoch: bool = False,
    ) -> None:
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if length < global_batch:
            raise DataError(f"the data set has {length} items, fewer than one batch of {global_batch}")
        self.length, self.global_batch, self.seed = length, global_batch, seed
        self.rank, self.world_size, self.with_epoch = rank, world_size, with_epoch
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.length // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_splitmix64((self.seed & _M64) ^ _splitmix64(epoch)) >> 1)
        return torch.randperm(self.length, generator=g)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * (self.global_batch // self.world_size)

    def __iter__(self) -> Iterator[Any]:
        perm = self.permutation(self.epoch)
        per_rank = self.global_batch // self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            lo = b * self.global_batch + self.rank * per_rank
            for i in perm[lo : lo + per_rank].tolist():
                yield (i, self.epoch) if self.with_epoch else i


def collate(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of `ds[i]` dicts (the default collate does the same; this one has no surprises)."""
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
