"""Writing a shard set: the one writer every producer uses (`uvit prepare`, official features, shapes, arrays).

    w = ShardSetWriter(out, manifest)          # refuses an --out made otherwise; resumes one made the same way
    w.check_splits({"train": (digest, n)})     # read-only: same sources, no foreign shards (every rank)
    w.begin({"train": (digest, n)}, empty)     # rank 0: folders, empty_context.npy, an incomplete manifest
    for k in w.todo("train", n, sources): w.write("train", k, shard_data)
    w.finish("train", n)                       # rank 0: the split's entry from its shards' metas

The manifest is on disk from `begin`, so an interrupted run (Ctrl-C, kill -9, a full disk) is resumed by
rerunning the same command: `todo` keeps every finished shard whose files still hash to what its meta
recorded and re-makes the rest (missing, truncated, edited, flipped bits). Nothing half-written is read:
a shard appears by a directory rename once complete, the manifest and empty context by atomic writes.

Whether the sources changed is decided here, twice: `check_splits` compares the split's listing digest
(names, labels, captions; cheap, before anything is written) and `todo` compares, for every finished
shard, the digest each of its sources has now with the one its meta recorded (`ShardData.source_sha256`:
contents included, so other images under the same names, or one edited in place, are found). Either
difference refuses the run rather than mixing shards of old and new sources.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from uvit_cli.data.check import shard_is_intact
from uvit_cli.data.format import (
    EMPTY_CONTEXT,
    FORMAT,
    MANIFEST,
    SHARD_META,
    ManifestDamaged,
    ShardData,
    fingerprint,
    list_shards,
    new_manifest,
    read_manifest,
    remove_temporaries,
    shard_name,
    split_summary,
    to_storage,
    write_npy,
    write_shard,
)
from uvit_cli.errors import DataError
from uvit_cli.fileio import atomic_open, write_json_atomic

Splits = dict[str, tuple[str, int]]  # split -> (source digest, number of shards)
# shard index -> (name, digest) of each source the shard covers, as its sources are now
SourceDigests = Callable[[int], list[tuple[str, str]]]
_CHANGED = "use another --out, or delete it to start over"


class ShardSetWriter:
    """See the module docstring. `manifest` is what this run would write (`new_manifest`); `self.manifest`
    is the one to continue: the existing manifest when `out` was made with the same settings."""

    def __init__(self, out: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.out = Path(out)
        self.manifest = self._open(manifest)
        self.fingerprint: str = self.manifest["fingerprint"]

    def _open(self, manifest: dict[str, Any]) -> dict[str, Any]:
        out = self.out
        if out.exists() and not out.is_dir():
            raise DataError(f"--out {out} is a file; choose a folder")
        try:
            old = read_manifest(out) if (out / MANIFEST).exists() else None
        except ManifestDamaged:
            if not _holds_our_shards(out):
                raise
            old = None  # rebuilt from the shards' own metas below (check_splits refuses foreign ones)
        else:
            if old is None and out.exists() and any(out.iterdir()):
                raise DataError(f"{out} is not empty and holds no {MANIFEST}; choose an empty or new --out")
        if old is None:
            return manifest
        if old.get("fingerprint") != manifest["fingerprint"]:
            a, b = old.get("settings", {}), manifest["settings"]
            diff = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
            raise DataError(
                f"{out} holds shards made with other settings (differs in: {', '.join(diff) or 'fingerprint'}); "
                "use another --out, or delete it to start over"
            )
        for key in ("context_shape", "context_dtype", "encoders"):  # known only once the encoders ran
            old[key] = old.get(key) or manifest.get(key)
        return old

    def check_splits(self, splits: Splits) -> None:
        """Refuse splits whose sources changed, and shards made with other settings or past the end."""
        for name, (digest, n_shards) in splits.items():
            entry = self.manifest["splits"].get(name)
            if isinstance(entry, dict) and entry.get("source_digest") not in (None, digest):
                raise DataError(
                    f"{self.out}/{name}: its sources (the listed images, captions or feature files) changed since "
                    f"these shards were made; {_CHANGED}"
                )
            split_dir = self.out / name
            for k in list_shards(split_dir):
                meta = _meta(split_dir, k)
                if meta is not None and (meta.get("fingerprint") != self.fingerprint or k >= n_shards):
                    raise DataError(
                        f"{split_dir / shard_name(k)} was made with other settings; use another --out or "
                        f"delete {self.out}"
                    )

    def begin(self, splits: Splits, empty_context: np.ndarray | None = None) -> None:
        """Create the folders, drop leftovers of killed runs, write the empty context and a manifest whose
        unfinished splits say so (rank 0 only)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if empty_context is not None:
            with atomic_open(self.out / EMPTY_CONTEXT, "wb") as f:
                write_npy(f, np.asarray(empty_context, np.float32))
            self.manifest["context_shape"] = list(empty_context.shape)
            self.manifest["context_dtype"] = self.manifest.get("context_dtype") or self.manifest["dtype"]
        for name, (digest, _) in splits.items():
            (self.out / name).mkdir(exist_ok=True)
            remove_temporaries(self.out / name)
            entry = self.manifest["splits"].get(name)
            if not (isinstance(entry, dict) and entry.get("complete")):
                self.manifest["splits"][name] = {"complete": False, "source_digest": digest}
        write_json_atomic(self.out / MANIFEST, self.manifest)

    def todo(self, split: str, shards: int | list[int], sources: SourceDigests | None = None) -> list[int]:
        """Which of `shards` (a count, or this rank's indices) to write: those missing or damaged. A damaged
        shard is removed here, so `write` puts a fresh one in its place. Hashes every finished shard, against
        the manifest's record where the split is complete, else against the shard's own meta. With `sources`,
        a finished shard made from sources that differ from today's refuses the run (DataError)."""
        split_dir = self.out / split
        entry = self.manifest["splits"].get(split)
        recorded: dict[str, dict[str, str]] = {}
        if isinstance(entry, dict) and isinstance(entry.get("shards"), list):
            recorded = {s.get("name"): s.get("sha256") for s in entry["shards"] if isinstance(s, dict)}
        todo, kept = [], []
        for k in range(shards) if isinstance(shards, int) else shards:
            meta = _meta(split_dir, k)
            if meta is not None:
                want = meta.get("sha256") or {}
                if recorded.get(shard_name(k), want) == want and shard_is_intact(
                    split_dir / shard_name(k), want
                ):
                    kept.append((k, meta))
                    continue
            todo.append(k)
        if sources is not None:
            for k, meta in kept:
                self._check_sources(split, k, meta, sources)
        for k in todo:
            if (split_dir / shard_name(k)).exists():
                _remove_shard(split_dir, k)
        return todo

    def _check_sources(self, split: str, index: int, meta: dict[str, Any], sources: SourceDigests) -> None:
        made = meta.get("source_sha256")
        if not isinstance(made, list):  # written before shards recorded their sources: nothing to compare
            return
        now = sources(index)
        changed = next((name for (name, digest), old in zip(now, made, strict=False) if digest != old), None)
        if changed is None and len(now) != len(made):
            changed = f"{len(now)} sources where there were {len(made)}"
        if changed is not None:
            raise DataError(
                f"{self.out}/{split}: its sources changed since these shards were made ({changed} is not what "
                f"{shard_name(index)} was made from: other contents, captions or labels); {_CHANGED}"
            )

    def write(self, split: str, index: int, shard: ShardData) -> dict[str, Any]:
        return write_shard(self.out / split, index, shard, self.fingerprint)

    def finish(self, split: str, n_shards: int) -> dict[str, Any]:
        """Record the split as complete, from its shards' metas (rank 0, after every rank wrote its own)."""
        split_dir = self.out / split
        metas = [_meta(split_dir, k) for k in range(n_shards)]
        missing = [k for k, m in enumerate(metas) if m is None]
        if missing:
            raise DataError(f"{split_dir}: shards {missing[:5]} missing after the run; rerun the command")
        digest = self.manifest["splits"].get(split, {}).get("source_digest", "")
        self.manifest["splits"][split] = split_summary(metas, digest)  # type: ignore[arg-type]
        write_json_atomic(self.out / MANIFEST, self.manifest)
        return self.manifest["splits"][split]


def _meta(split_dir: Path, index: int) -> dict[str, Any] | None:
    """A finished shard's meta; None when missing or unreadable (such a shard is re-made)."""
    import json

    try:
        meta = json.loads((split_dir / shard_name(index) / SHARD_META).read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _remove_shard(split_dir: Path, index: int) -> None:
    """Move a damaged shard out of the way first (a reader never sees half of it), then delete it."""
    doomed = split_dir / f".tmp-damaged-{shard_name(index)}-{os.getpid()}"
    os.rename(split_dir / shard_name(index), doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _holds_our_shards(out: Path) -> bool:
    return any(
        (d / SHARD_META).is_file() for split in out.iterdir() if split.is_dir() for d in split.glob("shard-*")
    )


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
    writer = ShardSetWriter(
        root,
        new_manifest(
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
        ),
    )
    assert writer.fingerprint == fingerprint(settings)
    n = x.shape[0]
    n_shards = -(-n // items_per_shard)
    splits = {split: ("", n_shards)}
    writer.check_splits(splits)
    writer.begin(splits, empty_context)
    for k in writer.todo(split, n_shards):
        lo, hi = k * items_per_shard, min((k + 1) * items_per_shard, n)
        shard = ShardData(
            x=x[lo:hi] if space == "pixel" else to_storage(x[lo:hi].astype(np.float32), dtype),
            keys=[str(i) for i in range(lo, hi)],
            sources=hi - lo,
            y=None if y is None else np.asarray(y[lo:hi], dtype=np.int64),
            contexts=None
            if contexts is None
            else [to_storage(np.asarray(c, np.float32), dtype) for c in contexts[lo:hi]],
        )
        writer.write(split, k, shard)
    writer.finish(split, n_shards)
    return Path(root)
