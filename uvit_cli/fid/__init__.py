"""`uvit fid`: FID with clean-fid's protocols and the ADM evaluator's table (IS, FID, sFID, precision, recall),
with a local Inception; CLIP score through a hook.

Entry points (each returns a result with a protocol stamp; none prints):
  compute_fid(samples, ref)          folder or .npz of images vs a reference npz
  make_ref_stats(images, out)        reference npz from a folder or .npz of images
  fid_from_generator(batches, ref)   a stream of uint8 (B, H, W, 3) batches (the sampler's hook)
`metrics=` (`fid`, `sfid`, `is`, `pr`, `clip`; `parse_metrics` reads "all" and comma lists) picks the
numbers; one Inception pass over the images gives all of them (`features.Collector`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uvit_cli import dist
from uvit_cli.errors import ConfigError, DataError
from uvit_cli.fid.measure import Setup, check_pr_memory, checked_stats, fid_result
from uvit_cli.fid.metrics import (
    ClipScoreFn,
    check_metrics_mode,
    needs_logits,
    needs_pool_features,
    needs_spatial,
    parse_metrics,
)
from uvit_cli.fid.reference import Reference, load_reference
from uvit_cli.fid.result import (
    MIN_IMAGES,
    FidResult,
    RefResult,
    make_stamp,
    samples_stamp_path,
    size_warnings,
    write_stamp,
)
from uvit_cli.fid.stats import (
    INCEPTION_DIM,
    FeatureStats,
    check_stats,
    frechet_distance,
    load_ref_stats,
    save_stats,
    stats_path,
)
from uvit_cli.fileio import check_outputs
from uvit_cli.inception import SPATIAL_DIM

__all__ = [
    "MIN_IMAGES",
    "FeatureStats",
    "FidResult",
    "RefResult",
    "check_request",
    "check_stats",
    "compute_fid",
    "fid_from_generator",
    "frechet_distance",
    "load_ref_stats",
    "make_ref_stats",
    "parse_metrics",
    "save_stats",
    "samples_stamp_path",
    "stats_path",
    "write_stamp",
]


def _setup(
    mode: str, inception_weights: Any, device: Any, features: Any, feature_dim: int, metrics: Sequence[str]
) -> Setup:
    from uvit_cli.fid.features import check_mode, inception_features

    check_mode(mode)
    device = dist.device(device)
    dist.cuda_defaults(device, tf32=False)  # autotuned convolutions; features and metrics stay fp32
    if features is not None:  # a stand-in extractor (tests, other feature spaces)
        return Setup(features, device, feature_dim, {"path": None, "sha256": None, "note": "custom features"})
    from uvit_cli.fileio import sha256_file
    from uvit_cli.inception import load_inception, no_head_error, resolve_weights

    path = resolve_weights(inception_weights, mode, need_head=needs_logits(metrics))
    model = load_inception(path).to(device)
    head = getattr(model, "logits_weight", None) is not None
    if needs_logits(metrics) and not head:
        raise no_head_error(path)
    fn = inception_features(model, mode, spatial=needs_spatial(metrics), logits=needs_logits(metrics))
    weights = {"path": str(path), "sha256": sha256_file(path), "classifier_head": head}
    return Setup(fn, device, INCEPTION_DIM, weights, inception=True, spatial_dim=SPATIAL_DIM)


def check_request(
    ref: str | os.PathLike,
    metrics: str | Iterable[str],
    mode: str,
    *,
    features: Any = None,
    feature_dim: int | None = INCEPTION_DIM,
    clip_score: ClipScoreFn | None = None,
) -> tuple[tuple[str, ...], Reference]:
    """The cheap checks before the Inception loads (and before hours of sampling): the metrics and their
    mode, the CLIP scorer when asked, and a reference that has what each metric needs."""
    from uvit_cli.fid.features import check_mode

    names = parse_metrics(metrics)
    check_metrics_mode(names, check_mode(mode))
    if "clip" in names and clip_score is None:
        raise ConfigError("--metrics clip: no CLIP image encoder was given to score the images with")
    inception = features is None
    reference = load_reference(
        ref, names, mode=mode, dim=INCEPTION_DIM if inception else feature_dim,
        spatial_dim=SPATIAL_DIM if inception else None, inception=inception,
    )  # fmt: skip
    return names, reference


def _default_workers(device: Any) -> int:
    # Decoding + PIL resize become the bottleneck once Inception runs on a GPU; on CPU they are ~3% of it.
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def _count_images(images: str | os.PathLike) -> int:
    """The number of images of a folder or npz; a missing/empty folder, stray files or a bad npz fail here,
    before the Inception loads."""
    from uvit_cli.fid.images import list_images, npz_images_info

    p = Path(images)
    if p.is_file() and p.suffix == ".npz":
        n = npz_images_info(p)[0]
        if n == 0:
            raise DataError(f"{p}: arr_0 holds no images")
        return n
    if not p.exists():
        raise DataError(f"no such folder or .npz: {p}")
    return len(list_images(p))


def _images_stats(
    images: str | os.PathLike, s: Setup, mode: str, batch_size: int, workers: int | None, progress: Any,
    collector: Any,
) -> tuple[FeatureStats, set[tuple[int, int]], str]:  # fmt: skip
    """Pool statistics of a folder or an npz of images, this rank's share merged over ranks, the image sizes
    and the kind of source; the other metrics' state goes to `collector`."""
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
        stats, sizes = batches_stats(
            stream, s.features, mode, s.device, prog, n, s.dim, collector=collector, indices=range(lo, hi)
        )
        kind = "npz"
    elif not p.exists():
        raise DataError(f"no such folder or .npz: {p}")
    else:
        files = list_images(p)
        w = _default_workers(s.device) if workers is None else workers
        stats, sizes = folder_stats(
            files, s.features, mode, s.device, batch_size, w, progress, s.dim, collector=collector
        )
        kind = "folder"
    return all_reduce_stats(stats, s.device), sizes, kind


def _collector(metrics: Sequence[str], clip: ClipScoreFn | None, prompts: Any) -> Any:
    from uvit_cli.fid.features import Collector

    return Collector(metrics, clip=clip, prompts=prompts)


def _reference_features(
    ref: Reference, s: Setup, mode: str, batch_size: int, progress: Any
) -> np.ndarray | None:
    """The reference's pool features for precision/recall: stored ones, or those of its `arr_0` images."""
    if ref.pool_features is not None or not ref.images:
        return ref.pool_features
    col = _collector(("pr",), None, None)
    _images_stats(ref.path, s, mode, batch_size, 0, progress, col)
    return col.merged(s.device, s.dim).pool_features


def compute_fid(
    samples: str | os.PathLike,
    ref: str | os.PathLike,
    *,
    metrics: str | Iterable[str] = ("fid",),
    mode: str = "clean",
    inception_weights: str | os.PathLike | None = None,
    device: Any = None,
    batch_size: int = 50,
    workers: int | None = None,
    progress: Any = None,
    features: Any = None,
    feature_dim: int = 2048,
    clip_score: ClipScoreFn | None = None,
) -> FidResult:
    """The `metrics` of a folder or .npz of images against a reference npz. Under torchrun each rank takes a
    slice. `features` replaces the Inception by any `(B,3,H,W) float [0,255] -> (B, feature_dim)` function
    (or a dict with `pool`, `spatial`, `logits`); `clip_score` scores images against the prompts of the folder's
    samples.jsonl."""
    t0 = time.time()
    # Fail on a bad request, reference or images before loading the Inception (and before hours of work).
    names, reference = check_request(
        ref, metrics, mode, features=features, feature_dim=feature_dim, clip_score=clip_score
    )
    n = _count_images(samples)
    prompts = _prompts(samples) if "clip" in names else None
    with dist.process_group():  # torchrun's, if any; left when done if joined here
        s = _setup(mode, inception_weights, device, features, feature_dim, names)
        if needs_pool_features(names):
            check_pr_memory(
                n,
                len(reference.pool_features) if reference.pool_features is not None else reference.images,
                s.dim,
                s.device,
            )
        col = _collector(names, clip_score, prompts)
        stats, sizes, kind = _images_stats(samples, s, mode, batch_size, workers, progress, col)
        collected = col.merged(s.device, s.dim)
        ref_feats = _reference_features(reference, s, mode, batch_size, progress) if "pr" in names else None
        source = {"path": str(samples), "kind": kind}
        return fid_result(stats, collected, reference, ref_feats, s, mode, names, sizes, t0, source)


def _prompts(samples: str | os.PathLike) -> Callable[[Sequence[int]], list[str]]:
    """The prompt of each image of a `uvit sample` folder, by its position in the sorted file list."""
    from uvit_cli.fid.images import folder_prompts, list_images

    p = Path(samples)
    if not p.is_dir():
        raise DataError(
            f"{p}: CLIP score needs prompts; measure the folder `uvit sample` wrote (its samples.jsonl has them)"
        )
    texts = folder_prompts(p, list_images(p))
    return lambda index: [texts[i] for i in index]


def fid_from_generator(
    batches: Iterable[Any],
    ref: str | os.PathLike,
    *,
    metrics: str | Iterable[str] = ("fid",),
    mode: str = "clean",
    inception_weights: str | os.PathLike | None = None,
    device: Any = None,
    total: int | None = None,
    progress: Any = None,
    generator: dict[str, Any] | None = None,
    features: Any = None,
    feature_dim: int = 2048,
    indices: Iterable[int] | None = None,
    prompts: Callable[[Sequence[int]], list[str]] | None = None,
    clip_score: ClipScoreFn | None = None,
) -> FidResult:
    """The `metrics` of images streamed as uint8 (B, H, W, 3) batches (numpy or torch), no PNGs written.

    `generator` (checkpoint, sampler, steps, cfg_scale, ema, seed, ...) goes into the stamp as is. Under
    torchrun every rank passes its own share of the batches; the statistics are summed over ranks.
    `indices`: each image's global index in stream order (default rank, rank + world, ..., the share
    `fid_of_model` generates); `prompts(indices)`: their prompts, for `clip_score`. `total`: this rank's images.
    """
    from uvit_cli.fid.features import all_reduce_stats, batches_stats, rank_world

    t0 = time.time()
    names, reference = check_request(
        ref, metrics, mode, features=features, feature_dim=feature_dim, clip_score=clip_score
    )
    if "clip" in names and prompts is None:
        raise ConfigError("--metrics clip: these images come without prompts (a text-to-image model's do)")
    s = _setup(mode, inception_weights, device, features, feature_dim, names)
    if needs_pool_features(names) and total is not None:
        n_ref = len(reference.pool_features) if reference.pool_features is not None else reference.images
        check_pr_memory(total * rank_world()[1], n_ref, s.dim, s.device)
    col = _collector(names, clip_score, prompts)
    stats, sizes = batches_stats(
        batches, s.features, mode, s.device, progress, total, s.dim, collector=col, indices=indices
    )
    stats = all_reduce_stats(stats, s.device)
    collected = col.merged(s.device, s.dim)
    ref_feats = _reference_features(reference, s, mode, 50, None) if "pr" in names else None
    source = {"kind": "generator", "generator": generator or {}}
    return fid_result(stats, collected, reference, ref_feats, s, mode, names, sizes, t0, source)


def make_ref_stats(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    metrics: str | Iterable[str] = ("fid",),
    mode: str = "clean",
    inception_weights: str | os.PathLike | None = None,
    device: Any = None,
    batch_size: int = 50,
    workers: int | None = None,
    progress: Any = None,
    features: Any = None,
    feature_dim: int = 2048,
) -> RefResult:
    """A reference npz of a folder or .npz of images, written to `out` (`.npz` appended unless it ends so;
    `out` must not be the images or the Inception weights): `mu`, `sigma` (float64) and `meta` always, and
    what `metrics` need: `mu_s`/`sigma_s` (sfid), `pool_features` (N, 2048) float32 (pr). With `is` the
    stamp records the images' Inception Score."""
    from uvit_cli.fid.features import check_mode, rank_world

    t0 = time.time()
    names = parse_metrics(metrics)
    check_metrics_mode(names, check_mode(mode))
    if "clip" in names:
        raise ConfigError(
            "--metrics clip: CLIP score compares samples with their prompts; a reference holds nothing for it"
        )
    inputs = {"IMAGES": images, "--inception-weights": inception_weights}
    check_outputs({"--out": stats_path(out)}, inputs)
    n = _count_images(images)
    with dist.process_group():  # torchrun's, if any; left when done if joined here
        s = _setup(mode, inception_weights, device, features, feature_dim, names)
        if needs_pool_features(names):
            check_pr_memory(n, 0, s.dim, s.device)
        col = _collector(names, None, None)
        stats, sizes, kind = _images_stats(images, s, mode, batch_size, workers, progress, col)
        collected = col.merged(s.device, s.dim)
        rank, world = rank_world()
    mu, sigma = checked_stats(stats, s, str(images), s.dim, "features")
    extra: dict[str, np.ndarray] = {}
    fields: dict[str, Any] = {"metrics": list(names), "mode": mode, "num_images": stats.n}
    if "sfid" in names:
        extra["mu_s"], extra["sigma_s"] = checked_stats(
            collected.spatial, s, str(images), s.spatial_dim, "spatial features"
        )
    if "pr" in names:
        extra["pool_features"] = collected.pool_features
    if "is" in names:
        fields["inception_score"] = collected.is_chunks.score()
    fields["stored"] = ["mu", "sigma", *extra]
    fields["images"] = {"path": str(images), "kind": kind}
    warns = size_warnings(stats.n, sizes, names)
    stamp = make_stamp("fid_reference", fields, s.weights, s.device, sizes, world, t0, warns)
    is_main = rank == 0
    path = save_stats(out, mu, sigma, stamp, extra) if is_main else None
    return RefResult(path, stats.n, stamp, warns, is_main)
