"""What a reference `.npz` gives each metric, checked before any image is measured.

| metric | keys | written by |
|---|---|---|
| fid | `mu`, `sigma` (pool_3, 2048) | `uvit fid ref`, U-ViT's fid_stats, clean-fid, ADM's reference batches |
| sfid | `mu_s`, `sigma_s` (mixed_6/conv[..., :7], 2023, NHWC) | `uvit fid ref --metrics sfid`, ADM's batches |
| pr | `pool_features` (M, 2048) float32, else `arr_0` uint8 (M, H, W, 3) images, measured here | `uvit fid ref --metrics pr`; ADM's batches (images) |
| is | nothing: the Inception Score is the samples' alone | |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uvit_cli.errors import DataError
from uvit_cli.fid.metrics import PR_K
from uvit_cli.fid.stats import check_ref_mode, check_stats, load_ref_stats

POOL_FEATURES = "pool_features"


@dataclass
class Reference:
    """A reference as the requested metrics use it: Fréchet statistics by metric, and for precision/recall
    either stored pool features or the number of `arr_0` images to measure."""

    path: Path
    frechet: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # fid, sfid
    pool_features: np.ndarray | None = None
    images: int = 0  # arr_0 images whose features precision/recall need (0: stored features, or no pr)


def _keys(p: Path) -> set[str]:
    """The members of a reference npz, or one line when it is not one."""
    if not p.is_file():
        raise DataError(f"reference statistics not found: {p}")
    with open(p, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"
    if not is_zip:
        raise DataError(
            f"{p} is not an .npz of statistics; make one with `uvit fid ref IMAGES --out REF.npz`"
        )
    try:
        with np.load(p, allow_pickle=False) as f:
            return set(f.files)
    except Exception as e:  # zipfile.BadZipFile, OSError
        raise DataError(
            f"cannot read reference statistics {p}: {str(e).splitlines()[0] if str(e) else e!r}"
        ) from None


def _missing(p: Path, keys: set[str], want: str, metric: str, why: str) -> DataError:
    return DataError(
        f"{p} has no {want}, {why} (keys: {', '.join(sorted(keys)[:6])}); make a reference that has it with "
        f"`uvit fid ref IMAGES --metrics {metric} --out REF.npz`"
        + (" or use ADM's reference batch" if metric in ("sfid", "pr") else "")
    )


def load_reference(
    path: str | os.PathLike,
    metrics: tuple[str, ...],
    *,
    mode: str,
    dim: int | None,
    spatial_dim: int | None,
    inception: bool,
) -> Reference:
    """The parts of `path` that `metrics` need, each checked (`check_stats`; features finite, of `dim`
    columns). A missing key is one line naming it and the command that makes it. `inception`: the features
    are the FID Inception's (ReLU outputs, never negative)."""
    p = Path(path)
    keys = _keys(p)
    check_ref_mode(p, mode)
    ref = Reference(p)
    if "fid" in metrics:
        ref.frechet["fid"] = load_ref_stats(p, dim, inception=inception, mode=mode)
    if "sfid" in metrics:
        if not {"mu_s", "sigma_s"} <= keys:
            raise _missing(p, keys, "`mu_s`/`sigma_s`", "sfid", "the spatial statistics sFID compares with")
        with np.load(p, allow_pickle=False) as f:
            mu_s, sigma_s = f["mu_s"], f["sigma_s"]
        ref.frechet["sfid"] = check_stats(
            mu_s, sigma_s, f"{p} (mu_s, sigma_s)", dim=spatial_dim, inception=inception,
            fix="make spatial statistics with `uvit fid ref IMAGES --metrics sfid --out REF.npz`",
        )  # fmt: skip
    if "pr" in metrics:
        if POOL_FEATURES in keys:
            with np.load(p, allow_pickle=False) as f:
                ref.pool_features = _checked_features(f[POOL_FEATURES], p, dim, inception)
        elif "arr_0" in keys:
            from uvit_cli.fid.images import npz_images_info

            ref.images = npz_images_info(p)[0]
            if ref.images <= PR_K:
                raise DataError(
                    f"{p}: arr_0 holds {ref.images} images; precision/recall need more than {PR_K}"
                )
        else:
            raise _missing(
                p, keys, f"`{POOL_FEATURES}` nor `arr_0` images", "pr",
                "which precision and recall compare the samples with, image by image",
            )  # fmt: skip
    return ref


def _checked_features(a: np.ndarray, p: Path, dim: int | None, inception: bool) -> np.ndarray:
    fix = f"make them again with `uvit fid ref IMAGES --metrics pr --out {p.name}`"
    if a.dtype.kind not in "fiu" or a.ndim != 2 or (dim is not None and a.shape[1] != dim):
        want = f"(M, {dim})" if dim else "(M, D)"
        raise DataError(f"{p}: {POOL_FEATURES} is {a.dtype} {a.shape}, want real numbers {want}; {fix}")
    if a.shape[0] <= PR_K:
        raise DataError(
            f"{p}: {POOL_FEATURES} of {a.shape[0]} images; precision/recall need more than {PR_K}"
        )
    f = a.astype(np.float32)
    if not np.isfinite(f).all():
        raise DataError(f"{p}: {POOL_FEATURES} holds NaN or infinite values; {fix}")
    if inception and f.min() < 0:
        raise DataError(
            f"{p}: {POOL_FEATURES} has negative entries, but the FID Inception's features are never negative; {fix}"
        )
    return f
