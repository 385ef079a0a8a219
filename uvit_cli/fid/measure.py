"""From what one pass collected to the numbers and the protocol stamp of `uvit fid`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from uvit_cli.errors import DataError
from uvit_cli.fid.metrics import IS_SPLIT, PR_BLOCK, PR_K
from uvit_cli.fid.reference import Reference
from uvit_cli.fid.result import FidResult, make_stamp, size_warnings
from uvit_cli.fid.stats import FeatureStats, check_stats, frechet_distance, read_meta, ref_protocol


@dataclass
class Setup:
    """The feature function a run measures with, where it runs, and what the stamp records of it."""

    features: Any
    device: Any
    dim: int
    weights: dict[str, Any]
    inception: bool = False  # the FID Inception (not a stand-in): its features are never negative
    spatial_dim: int | None = None  # known for the Inception; a stand-in's is what it returns


def check_pr_memory(n_samples: int, n_ref: int, dim: int, device: Any) -> None:
    """Precision/recall keep every pool feature (float32): 50,000 + 10,000 images x 2048 = 480 MB, held twice
    while ranks gather; on the CPU also the distance blocks."""
    from uvit_cli.resources import require_memory

    feats = (n_samples + n_ref) * dim * 4
    blocks = 3 * PR_BLOCK * min(PR_BLOCK, max(n_samples, n_ref)) * 4 if device.type == "cpu" else 0
    require_memory(
        f"precision/recall over {n_samples:,} samples and {n_ref:,} reference images",
        2 * feats + blocks,
        fix="measure fewer images, or leave pr out of --metrics",
    )


def _measure(
    stats: FeatureStats, collected: Any, ref: Reference, ref_feats: np.ndarray | None, s: Setup,
    metrics: tuple[str, ...], what: str,
) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    """(the numbers by stamp key, with fid_raw/sfid_raw; the protocol of each) of the collected features."""
    values: dict[str, float] = {}
    protocol: dict[str, Any] = {}
    if "fid" in metrics:
        mu, sigma = checked_stats(stats, s, what, s.dim, "features")
        raw = frechet_distance(mu, sigma, *ref.frechet["fid"])
        values |= {"fid": max(raw, 0.0), "fid_raw": raw}
        protocol["fid"] = {"features": "pool_3 (2048)", "statistics": "mean, np.cov(rowvar=False)"}
    if "sfid" in metrics:
        mu_s, sigma_s = checked_stats(collected.spatial, s, what, s.spatial_dim, "spatial features")
        rmu, rsigma = check_stats(*ref.frechet["sfid"], f"{ref.path} (mu_s, sigma_s)", dim=mu_s.shape[0])
        raw = frechet_distance(mu_s, sigma_s, rmu, rsigma)
        values |= {"sfid": max(raw, 0.0), "sfid_raw": raw}
        protocol["sfid"] = {"features": "mixed_6/conv[..., :7] at 17x17, flattened NHWC (2023)"}
    if "is" in metrics:
        chunks = collected.is_chunks
        values["inception_score"] = chunks.score()
        protocol["inception_score"] = {
            "split_size": IS_SPLIT, "chunks": int((chunks.count > 0).sum()),
            "logits": "pool_3 @ softmax/logits weight, without the bias",
        }  # fmt: skip
    if "pr" in metrics:
        from uvit_cli.fid.manifold import precision_recall

        assert ref_feats is not None and collected.pool_features is not None
        if len(collected.pool_features) <= PR_K:
            raise DataError(
                f"precision/recall of {len(collected.pool_features)} images: k = {PR_K} needs more than {PR_K}"
            )
        precision, recall, fallbacks = precision_recall(ref_feats, collected.pool_features, device=s.device)
        values |= {"precision": precision, "recall": recall}
        protocol["precision_recall"] = {
            "k": PR_K, "distance": "squared L2 on pool_3",
            "arithmetic": "float16 blocks as ADM's evaluator, float32 where a block is not finite",
            "float32_blocks": fallbacks, "reference_images": int(len(ref_feats)),
            "reference_features": "pool_features" if ref.pool_features is not None else "arr_0 images",
        }  # fmt: skip
    if "clip" in metrics:
        total, n = collected.clip
        values["clip_score"] = total / max(n, 1)
        protocol["clip_score"] = {"images": n, "definition": "100 * max(cos(image, text), 0), averaged"}
    return values, protocol


def checked_stats(
    stats: FeatureStats, s: Setup, what: str, dim: int | None, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma of features uvit extracted, through the same `check_stats` as every reference."""
    mu, sigma = stats.mu_sigma()
    weights = s.weights["path"] or "the feature function"
    return check_stats(
        mu, sigma, f"the {kind} of {what}", dim=dim, inception=s.inception,
        fix=f"{weights} does not give real features (damaged weights?)",
    )  # fmt: skip


def fid_result(
    stats: FeatureStats, collected: Any, ref: Reference, ref_feats: np.ndarray | None, s: Setup, mode: str,
    metrics: tuple[str, ...], sizes: set, t0: float, source: dict,
) -> FidResult:  # fmt: skip
    from uvit_cli.fid.features import rank_world
    from uvit_cli.fileio import sha256_file

    rank, world = rank_world()
    if stats.n == 0:
        raise DataError("no images to measure")
    values, protocol = _measure(
        stats, collected, ref, ref_feats, s, metrics, source.get("path", "the generated images")
    )
    warns = size_warnings(stats.n, sizes, metrics)
    ref_meta = read_meta(ref.path)
    ref_mode, origin = ref_protocol(
        ref.path
    )  # a recorded mode other than `mode` was refused by check_request
    if ref_mode is not None and ref_mode != mode:
        warns.append(
            f"the reference looks like {origin}: numbers comparable with it need --mode {ref_mode} "
            f"(these samples used {mode})"
        )
    fields = {
        **values,
        "metrics": list(metrics),
        "mode": mode,
        "num_images": stats.n,
        "samples": source,
        "reference": {
            "path": str(ref.path),
            "sha256": sha256_file(ref.path),
            "num_images": ref_meta.get("num_images") or ref.images or None,
            "mode": ref_mode,  # recorded, or implied by a known origin (None: unknown)
            "mode_from": origin,
        },
        "protocol": protocol,
    }
    stamp = make_stamp("fid", fields, s.weights, s.device, sizes, world, t0, warns)
    shown = {k: v for k, v in values.items() if not k.endswith("_raw")}
    nan = float("nan")
    return FidResult(
        values.get("fid", nan), values.get("fid_raw", nan), stats.n, stamp, warns, rank == 0, shown
    )
