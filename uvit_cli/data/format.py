"""The shard format: the on-disk layout `uvit prepare` writes, its manifest, and one shard's write and read.

    OUT/manifest.json                 what the set is (see `new_manifest`); written atomically
    OUT/empty_context.npy             text sets: CLIP("") as (77, D) float32, the CFG null condition
    OUT/<split>/shard-00000/          one directory per shard; it appears (rename) only when complete
        x.npy                (n, V, C, h, w)  moments (float16 by default) or pixels (uint8, CHW)
                                              V views per item: 1, or 2 = the item and its horizontal flip
        y.npy                (n,) int64        class sets
        context.npy          (m, 77, D)        text sets: every caption of every item, flat
        context_offsets.npy  (n + 1,) int64    captions of item j are context[off[j]:off[j + 1]]
        items.json           {"keys": [...], "captions": [[...], ...]}  source of each item
        meta.json            fingerprint, counts, sha256 of every file, skipped sources, and (sets made
                             from files) `source_sha256`: per covered source, a digest of its key, label,
                             captions and bytes, which a rerun recomputes; written last

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uvit_cli.config import MANIFEST
from uvit_cli.errors import DataError
from uvit_cli.fileio import sha256_file, write_json_atomic, write_npy

FORMAT = "uvit-shards"
FORMAT_VERSION = 1
EMPTY_CONTEXT = "empty_context.npy"
SHARD_META = "meta.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})$")
FP16_MAX = 65504.0
_REMAKE = "rerun the same uvit prepare command to re-make what is damaged"


class ManifestDamaged(DataError):
    """manifest.json exists but cannot be what `uvit prepare` wrote (edited, truncated, another file)."""


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
    source_sha256: list[str] | None = None  # per covered source (`sources` of them), in order


def _save_npy(path: Path, arr: np.ndarray, shown: Path) -> None:
    """`arr` to `path`, flushed to disk; an OSError (a full disk: errno ENOSPC) names `shown`."""
    try:
        with open(path, "wb") as f:
            write_npy(f, arr)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # Python's buffered writer names no file; the temporary's name means nothing
        raise OSError(e.errno, e.strerror or str(e), str(shown)) from None


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
            _save_npy(tmp / name, arr, shown=final / name)
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
        if data.source_sha256 is not None:
            if len(data.source_sha256) != data.sources:
                raise ValueError(f"{len(data.source_sha256)} source digests for {data.sources} sources")
            meta["source_sha256"] = data.source_sha256
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
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
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
        root = Path(root)
        raise DataError(
            f"{path} not found: prepare the data first (uvit prepare ... --out {root.parent} --name {root.name})"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
        raise ManifestDamaged(f"{path}: unreadable manifest ({e}); {_REMAKE}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ManifestDamaged(f"{path}: not a uvit shard manifest")
    if not isinstance(m.get("splits"), dict) or not isinstance(m.get("fingerprint"), str):
        raise ManifestDamaged(f"{path}: damaged manifest (no splits or fingerprint); {_REMAKE}")
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


def split_entry(manifest: dict[str, Any], root: Path, split: str) -> dict[str, Any]:
    """The manifest entry of a finished split, or one line saying why there is none."""
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        have = ", ".join(manifest.get("splits", {})) or "none"
        raise DataError(f"{root}: no '{split}' split (prepared: {have})")
    if not isinstance(entry, dict) or not entry.get("complete"):
        raise DataError(f"{root}: the '{split}' split is incomplete; rerun the same uvit prepare command")
    shards = entry.get("shards")
    ok = isinstance(shards, list) and all(
        isinstance(s, dict)
        and isinstance(s.get("name"), str)
        and _SHARD_RE.match(s["name"])
        and isinstance(s.get("count"), int)
        and s["count"] >= 0
        and isinstance(s.get("sha256"), dict)
        for s in shards
    )
    if not ok or sum(s["count"] for s in shards) != entry.get("items"):
        raise DataError(
            f"{root / MANIFEST}: the '{split}' entry is damaged (its shard list does not add up); {_REMAKE}"
        )
    return entry
