"""`uvit fid`: FID against `mu`/`sigma` reference statistics, with clean-fid's protocols and a local Inception.

Entry points (each returns a result with a protocol stamp; none prints):
  compute_fid(samples, ref)          folder or .npz of images vs reference npz
  make_ref_stats(images, out)        reference npz from a folder or .npz of images
  fid_from_generator(batches, ref)   a stream of uint8 (B, H, W, 3) batches (the sampler's hook)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uvit_cli import dist
from uvit_cli.errors import DataError
from uvit_cli.fid.stats import (
    INCEPTION_DIM,
    FeatureStats,
    check_stats,
    frechet_distance,
    load_ref_stats,
    read_meta,
    ref_protocol,
    save_stats,
    stats_path,
)
from uvit_cli.fileio import check_outputs, write_json_atomic

__all__ = [
    "FeatureStats",
    "FidResult",
    "RefResult",
    "check_stats",
    "compute_fid",
    "fid_from_generator",
    "frechet_distance",
    "load_ref_stats",
    "make_ref_stats",
    "save_stats",
    "samples_stamp_path",
    "stats_path",
    "write_stamp",
]

MIN_IMAGES = 2048  # below the feature dimension the covariance is singular and FID is biased upward


def samples_stamp_path(samples: str | os.PathLike, mode: str) -> Path:
    """Where the stamp of `uvit fid SAMPLES REF` goes unless told: SAMPLES.fid-MODE.json beside the samples."""
    p = Path(samples)
    base = p.with_suffix("") if p.suffix == ".npz" else p
    return base.parent / f"{base.name}.fid-{mode}.json"


@dataclass
class FidResult:
    fid: float  # clamped at 0 when fid_raw is within round-off below it (FID(a, a) computes as about -1e-9)
    fid_raw: float
    num_images: int
    stamp: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    is_main: bool = True  # rank 0 under torchrun: the one that prints and writes

    def summary(self) -> str:
        """The one result line: FID, protocol, what was measured against what (and how, when generated)."""
        s = self.stamp
        inc = (s["inception"]["sha256"] or "custom")[:12]
        line = f"FID {self.fid:.4f}  mode {s['mode']}  images {s['num_images']}  inception {inc}  ref {s['reference']['sha256'][:12]}"
        g = s["samples"].get("generator")
        if g:
            gi = f" interval {g['guidance_interval']}" if g["guidance_interval"] else ""
            rate = self.num_images / max(s["seconds"], 1e-9)
            line += (
                f"  {g['preset']} {g['solver']} {g['steps']} steps cfg {g['cfg_scale']:g}{gi} seed {g['seed']}  "
                f"ckpt {g['checkpoint_sha256'][:12]}  {rate:.2f} img/s"
            )
        return line

    def default_stamp_path(self) -> Path:
        """Where the stamp goes unless told: beside the samples (SAMPLES.fid-MODE.json), or for a checkpoint
        beside it, named by what changes the number (<ckpt>.fid-MODE-nN-SOLVERSTEPS-cfgS-seedS.json)."""
        s = self.stamp
        g = s["samples"].get("generator")
        if g:
            ck = Path(g["checkpoint"])
            tag = f"{s['mode']}-n{g['n']}-{g['solver']}{g['steps']}-cfg{g['cfg_scale']:g}-seed{g['seed']}"
            return ck.with_name(f"{ck.stem}.fid-{tag}.json")
        return samples_stamp_path(s["samples"]["path"], s["mode"])


@dataclass
class RefResult:
    path: Path | None  # None on ranks other than 0
    num_images: int
    stamp: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    is_main: bool = True


@dataclass
class _Setup:
    features: Any
    device: Any
    dim: int
    weights: dict[str, Any]
    inception: bool = False  # the FID Inception (not a stand-in): its features are never negative


def _setup(mode: str, inception_weights: Any, device: Any, features: Any, feature_dim: int) -> _Setup:
    from uvit_cli.fid.features import check_mode, inception_features

    check_mode(mode)
    device = dist.device(device)
    if features is not None:  # a stand-in extractor (tests, other feature spaces)
        return _Setup(
            features, device, feature_dim, {"path": None, "sha256": None, "note": "custom features"}
        )
    from uvit_cli.fileio import sha256_file
    from uvit_cli.inception import load_inception, resolve_weights

    path = resolve_weights(inception_weights, mode)
    model = load_inception(path).to(device)
    return _Setup(
        inception_features(model, mode),
        device,
        INCEPTION_DIM,
        {"path": str(path), "sha256": sha256_file(path)},
        inception=True,
    )


def _default_workers(device: Any) -> int:
    # Decoding + PIL resize become the bottleneck once Inception runs on a GPU; on CPU they are ~3% of it.
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def _check_source(images: str | os.PathLike) -> None:
    """Fail on a missing/empty folder, stray files or a bad npz before loading the Inception."""
    from uvit_cli.fid.images import list_images, npz_images_info

    p = Path(images)
    if p.is_file() and p.suffix == ".npz":
        if npz_images_info(p)[0] == 0:
            raise DataError(f"{p}: arr_0 holds no images")
    elif not p.exists():
        raise DataError(f"no such folder or .npz: {p}")
    else:
        list_images(p)


def _images_stats(
    images: str | os.PathLike, s: _Setup, mode: str, batch_size: int, workers: int | None, progress: Any
) -> tuple[FeatureStats, set[tuple[int, int]], str]:
    """This rank's statistics of a folder or an npz of images, merged over ranks; also sizes and the kind."""
    from uvit_cli.fid.features import all_reduce_stats, batches_stats, folder_stats, rank_world
    from uvit_cli.fid.images import list_images, npz_batches, npz_images_info

    p = Path(images)
    rank, world = rank_world()
    if p.is_file() and p.suffix == ".npz":
        n = npz_images_info(p)[0]
        if n == 0:
            raise DataError(f"{p}: arr_0 holds no images")
        lo, hi = n * rank // world, n * (rank + 1) // world  # contiguous share: the stream never seeks back
        stream = npz_batches(p, batch_size, lo, hi)
        prog = None if progress is None else (lambda done, _t: progress(done * world, n))
        stats, sizes = batches_stats(stream, s.features, mode, s.device, prog, n, s.dim)
        kind = "npz"
    elif not p.exists():
        raise DataError(f"no such folder or .npz: {p}")
    else:
        files = list_images(p)
        w = _default_workers(s.device) if workers is None else workers
        stats, sizes = folder_stats(files, s.features, mode, s.device, batch_size, w, progress, s.dim)
        kind = "folder"
    return all_reduce_stats(stats, s.device), sizes, kind


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("uvit", "clean-fid", "torch", "numpy", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def _warnings(n: int, sizes: set[tuple[int, int]]) -> list[str]:
    out = []
    if n < MIN_IMAGES:
        out.append(
            f"only {n} images: below {MIN_IMAGES} the covariance is singular and FID is biased upward "
            "(the paper uses 50,000; 30,000 for MS-COCO)"
        )
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
        out.append(f"images of {len(sizes)} sizes ({shown}...): each was resized to 299x299 on its own")
    return out


def _stamp(
    metric: str, fields: dict, s: _Setup, sizes: set, world: int, t0: float, warns: list[str]
) -> dict[str, Any]:
    """A protocol stamp: `metric`, `fields`, then what every stamp records (Inception, image sizes, device,
    ranks, seconds since `t0`, package versions, warnings)."""
    return {
        "metric": metric,
        **fields,
        "inception": s.weights,
        "image_sizes": [f"{h}x{w}" for h, w in sorted(sizes)[:8]],
        "device": str(s.device),
        "world_size": world,
        "seconds": round(time.time() - t0, 2),
        "versions": _versions(),
        "warnings": warns,
    }


def _ref_stats(
    ref: str | os.PathLike, mode: str, features: Any, feature_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's mu, sigma, checked against what the samples will be measured with (before any work)."""
    from uvit_cli.fid.features import check_mode

    inception = features is None
    return load_ref_stats(
        ref, INCEPTION_DIM if inception else feature_dim, inception=inception, mode=check_mode(mode)
    )


def _fid_against(
    stats: FeatureStats,
    ref: str | os.PathLike,
    ref_stats: tuple[np.ndarray, np.ndarray],
    s: _Setup,
    mode: str,
    sizes: set,
    t0: float,
    source: dict,
) -> FidResult:
    from uvit_cli.fid.features import rank_world
    from uvit_cli.fileio import sha256_file

    rank, world = rank_world()
    if stats.n == 0:
        raise DataError("no images to measure")
    mu, sigma = _checked_stats(stats, s, source.get("path", "the generated images"))
    raw = frechet_distance(mu, sigma, *ref_stats)
    warns = _warnings(stats.n, sizes)
    ref_meta = read_meta(ref)
    ref_mode, origin = ref_protocol(ref)  # a recorded mode other than `mode` was refused by _ref_stats
    if ref_mode is not None and ref_mode != mode:
        warns.append(
            f"the reference looks like {origin}: numbers comparable with it need --mode {ref_mode} "
            f"(these samples used {mode})"
        )
    fields = {
        "fid": max(raw, 0.0),
        "fid_raw": raw,
        "mode": mode,
        "num_images": stats.n,
        "samples": source,
        "reference": {
            "path": str(ref),
            "sha256": sha256_file(ref),
            "num_images": ref_meta.get("num_images"),
            "mode": ref_mode,  # recorded, or implied by a known origin (None: unknown)
            "mode_from": origin,
        },
    }
    stamp = _stamp("fid", fields, s, sizes, world, t0, warns)
    return FidResult(max(raw, 0.0), raw, stats.n, stamp, warns, rank == 0)


def _checked_stats(stats: FeatureStats, s: _Setup, what: str) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma of features uvit extracted, through the same `check_stats` as every reference."""
    mu, sigma = stats.mu_sigma()
    weights = s.weights["path"] or "the feature function"
    return check_stats(
        mu,
        sigma,
        f"the features of {what}",
        dim=s.dim,
        inception=s.inception,
        fix=f"{weights} does not give real features (damaged weights?)",
    )


def compute_fid(
    samples: str | os.PathLike,
    ref: str | os.PathLike,
    *,
    mode: str = "clean",
    inception_weights: str | os.PathLike | None = None,
    device: Any = None,
    batch_size: int = 50,
    workers: int | None = None,
    progress: Any = None,
    features: Any = None,
    feature_dim: int = 2048,
) -> FidResult:
    """FID of a folder or .npz of images against reference `mu`/`sigma`. Under torchrun each rank takes a slice.

    `features` replaces the Inception by any `(B,3,H,W) float [0,255] -> (B, feature_dim)` function.
    """
    t0 = time.time()
    # Fail on a bad reference or bad images before loading the Inception (and before hours of work).
    ref_stats = _ref_stats(ref, mode, features, feature_dim)
    _check_source(samples)
    with dist.process_group():  # torchrun's, if any; left when done if joined here
        s = _setup(mode, inception_weights, device, features, feature_dim)
        stats, sizes, kind = _images_stats(samples, s, mode, batch_size, workers, progress)
        source = {"path": str(samples), "kind": kind}
        return _fid_against(stats, ref, ref_stats, s, mode, sizes, t0, source)


def fid_from_generator(
    batches: Iterable[Any],
    ref: str | os.PathLike,
    *,
    mode: str = "clean",
    inception_weights: str | os.PathLike | None = None,
    device: Any = None,
    total: int | None = None,
    progress: Any = None,
    generator: dict[str, Any] | None = None,
    features: Any = None,
    feature_dim: int = 2048,
) -> FidResult:
    """FID of images streamed as uint8 (B, H, W, 3) batches (numpy or torch), no PNGs written.

    `generator` (checkpoint, sampler, steps, cfg_scale, ema, seed, ...) goes into the stamp as is. Under
    torchrun every rank passes its own share of the batches; the statistics are summed over ranks.
    """
    from uvit_cli.fid.features import all_reduce_stats, batches_stats

    t0 = time.time()
    ref_stats = _ref_stats(ref, mode, features, feature_dim)
    s = _setup(mode, inception_weights, device, features, feature_dim)
    stats, sizes = batches_stats(batches, s.features, mode, s.device, progress, total, s.dim)
    stats = all_reduce_stats(stats, s.device)
    source = {"kind": "generator", "generator": generator or {}}
    return _fid_against(stats, ref, ref_stats, s, mode, sizes, t0, source)


def make_ref_stats(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str = "clean",
    inception_weights: str | os.PathLike | None = None,
    device: Any = None,
    batch_size: int = 50,
    workers: int | None = None,
    progress: Any = None,
    features: Any = None,
    feature_dim: int = 2048,
) -> RefResult:
    """Reference statistics (`mu`, `sigma` float64 + `meta`) of a folder or .npz of images, written to `out`
    (`.npz` appended unless it ends so); `out` must not be the images or the Inception weights."""
    from uvit_cli.fid.features import rank_world

    t0 = time.time()
    inputs = {"IMAGES": images, "--inception-weights": inception_weights}
    check_outputs({"--out": stats_path(out)}, inputs)
    _check_source(images)
    with dist.process_group():  # torchrun's, if any; left when done if joined here
        s = _setup(mode, inception_weights, device, features, feature_dim)
        stats, sizes, kind = _images_stats(images, s, mode, batch_size, workers, progress)
        rank, world = rank_world()
    mu, sigma = _checked_stats(stats, s, str(images))
    warns = _warnings(stats.n, sizes)
    fields = {"mode": mode, "num_images": stats.n, "images": {"path": str(images), "kind": kind}}
    stamp = _stamp("fid_reference", fields, s, sizes, world, t0, warns)
    is_main = rank == 0
    path = save_stats(out, mu, sigma, stamp) if is_main else None
    return RefResult(path, stats.n, stamp, warns, is_main)


def write_stamp(path: str | os.PathLike, stamp: dict[str, Any]) -> Path:
    """The protocol stamp as indented JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, stamp, indent=2)
    return p
