"""Feature statistics (streamed sums that merge across batches and ranks), the Fréchet distance, npz I/O.

Every mu/sigma that uvit reads or writes passes `check_stats`: statistics that cannot come from real
features (NaN, a sigma that is not symmetric or not positive semi-definite, a size that does not match)
are refused in one line, never turned into a number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uvit_cli.errors import DataError
from uvit_cli.fileio import atomic_open

INCEPTION_DIM = 2048  # pool3 features of the FID Inception
# Largest |S - Sᵀ| / max|S| accepted: np.cov and our sums are exactly symmetric (measured 0.0), a float32
# GEMM on a GPU is off by ~1e-7.
SYMMETRY_RTOL = 1e-5
# Most negative eigenvalue / largest |eigenvalue| accepted as round-off. Measured with 2048-d features:
# -6e-16 (float64 np.cov, 6 and 500 images), -1e-8 (the same stored as float32), -1.8e-5 (sums of xxᵀ
# in float32 minus n·mu·muᵀ, 500 images, the worst way to compute a covariance).
PSD_RTOL = 1e-4
# Most negative Fréchet distance / (tr S1 + tr S2) accepted as round-off (FID(a, a) is 0 exactly in
# theory): measured -1.9e-7 at worst for the covariances above.
FRECHET_RTOL = 1e-5


@dataclass
class FeatureStats:
    """Running sums of features: n, sum x, sum x xᵀ (float64). Sums add, so batches and ranks merge exactly."""

    n: int
    sum: np.ndarray  # (D,)
    sum_outer: np.ndarray  # (D, D)

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_features(cls, feats: np.ndarray) -> FeatureStats:
        f = np.asarray(feats, dtype=np.float64)
        return cls(f.shape[0], f.sum(0), f.T @ f)

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer)

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """mean and unbiased covariance, as `np.cov(feats, rowvar=False)` gives it."""
        if self.n < 2:
            raise DataError(f"need at least 2 images for a covariance, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2  # exact symmetry; rounding can break it by ~1e-17


def _negative_eigenvalue(ev: np.ndarray) -> float | None:
    """The most negative eigenvalue if it is below round-off (PSD_RTOL of the largest magnitude), else None."""
    scale = float(np.abs(ev).max(initial=0.0))
    low = float(ev.min(initial=0.0))
    return low if low < -PSD_RTOL * scale else None


def check_stats(
    mu: Any,
    sigma: Any,
    source: str,
    *,
    dim: int | None = None,
    inception: bool = False,
    fix: str = "make statistics with `uvit fid ref IMAGES --out REF.npz`",
) -> tuple[np.ndarray, np.ndarray]:
    """mu (D,), sigma (D, D) as float64 if they can be the mean and covariance of real features, else a
    DataError naming `source`, what is wrong and `fix`. `dim`: the D the features have; `inception`: they
    are the FID Inception's pool features, averages of ReLU outputs and so never negative."""
    arrays = {"mu": np.asarray(mu), "sigma": np.asarray(sigma)}
    for name, a in arrays.items():
        if a.dtype.kind not in "fiu":
            raise DataError(f"{source}: {name} holds {a.dtype} values, not real numbers; {fix}")
    mu, sigma = (a.astype(np.float64) for a in arrays.values())
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise DataError(
            f"{source}: mu {mu.shape} and sigma {sigma.shape} do not fit (want (D,) and (D, D)); {fix}"
        )
    if dim is not None and d != dim:
        raise DataError(
            f"{source}: statistics of dimension {d}, but the features measured here have {dim}; {fix} "
            "with the same feature extractor"
        )
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise DataError(f"{source}: {name} holds {bad} NaN or infinite values; {fix}")
    scale = float(np.abs(sigma).max())
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > SYMMETRY_RTOL * scale:
        raise DataError(
            f"{source}: sigma is not symmetric (max |S - S^T| = {asym:.3g}, max |S| = {scale:.3g}): "
            f"not a covariance; {fix}"
        )
    ev = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    low = _negative_eigenvalue(ev)
    if low is not None:
        raise DataError(
            f"{source}: sigma has a negative eigenvalue {low:.4g} (largest {ev.max():.4g}): not a covariance; "
            f"{fix}"
        )
    if inception and mu.min() < 0:
        raise DataError(
            f"{source}: mu has negative entries (min {mu.min():.4g}), but the FID Inception's features are "
            f"never negative: these are statistics of other features; {fix}"
        )
    return mu, sigma


def _sqrt_psd(ev: np.ndarray, what: str) -> np.ndarray:
    """Square roots of the eigenvalues of a PSD matrix. A negative one beyond round-off is an error; those
    below LAPACK's rounding level (D * eps * max) become 0: their square roots would add ~D * 1e-8 of noise
    to FID (measured -2e-5 for FID(a, a) with 6 images without this)."""
    low = _negative_eigenvalue(ev)
    if low is not None:
        raise DataError(
            f"{what} has a negative eigenvalue {low:.4g} (largest {ev.max():.4g}): not a covariance"
        )
    return np.sqrt(np.where(ev > ev.shape[0] * np.finfo(np.float64).eps * max(ev.max(), 0.0), ev, 0.0))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1-mu2||² + tr S1 + tr S2 - 2 tr sqrt(S1 S2)  (Heusel et al. 2017), in float64.

    tr sqrt(S1 S2) = tr sqrt(A S2 A) with A = sqrt(S1) (same eigenvalues; A S2 A is symmetric PSD), so two
    symmetric eigendecompositions replace scipy's general `sqrtm`: ~10x faster at 2048 dims and no complex
    parts to discard. Tiny negative eigenvalues (rank-deficient covariances, N < D) are rounding noise and
    set to 0; larger ones, and a distance below 0 beyond round-off, raise DataError (garbage in, no number out).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    a = (v * _sqrt_psd(w, "sigma1")) @ v.T
    m = a @ s2 @ a
    tr_covmean = _sqrt_psd(np.linalg.eigvalsh((m + m.T) / 2), "sqrt(sigma1) sigma2 sqrt(sigma1)").sum()
    diff = mu1 - mu2
    traces = float(np.trace(s1) + np.trace(s2))
    fid = float(diff @ diff + traces - 2 * tr_covmean)
    if not np.isfinite(fid) or fid < -FRECHET_RTOL * abs(traces):
        raise DataError(
            f"the Fréchet distance computes as {fid:.6g} (tr S1 + tr S2 = {traces:.6g}): "
            "these statistics are not the mean and covariance of real features"
        )
    return fid


def stats_path(path: str | os.PathLike) -> Path:
    """The file `save_stats(path, ...)` writes: `path`, with `.npz` appended unless it ends so (as np.savez)."""
    p = Path(path)
    return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")


def load_ref_stats(
    path: str | os.PathLike,
    dim: int | None = INCEPTION_DIM,
    *,
    inception: bool = False,
    mode: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`mu`, `sigma` (float64) of a reference npz, checked by `check_stats`; other keys (an ADM batch's
    `arr_0`) are never read. With `mode`, a reference that records another FID mode is refused: its features
    come from another preprocessing, so a distance to it measures nothing."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"reference statistics not found: {p}")
    with open(p, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"  # every .npz is a zip archive
    if not is_zip:
        raise DataError(
            f"{p} is not an .npz of statistics (mu, sigma); make one with `uvit fid ref IMAGES --out`"
        )
    try:
        with np.load(p, allow_pickle=False) as f:  # lazy: only the members we index are decompressed
            keys = set(f.files)
            if not {"mu", "sigma"} <= keys:
                raise DataError(
                    f"{p} has no `mu`/`sigma` (keys: {sorted(keys)[:6]}); make statistics with `uvit fid ref`"
                )
            mu, sigma = f["mu"], f["sigma"]
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError
        raise DataError(
            f"cannot read reference statistics {p}: {str(e).splitlines()[0] if str(e) else e!r}"
        ) from None
    if mode is not None:
        check_ref_mode(p, mode)
    return check_stats(mu, sigma, str(p), dim=dim, inception=inception)


def check_ref_mode(path: str | os.PathLike, mode: str) -> None:
    """Refuse a reference whose `meta` records another FID mode: its features come from another preprocessing."""
    made = read_meta(path).get("mode")
    if made and made != mode:
        raise DataError(
            f"{path} was made with --mode {made}, but these images are measured with --mode {mode}: the "
            f"features differ, so the distance would mean nothing; pass --mode {made}, or make a "
            f"reference with `uvit fid ref IMAGES --mode {mode} --out REF.npz`"
        )


def save_stats(
    path: str | os.PathLike,
    mu: np.ndarray,
    sigma: np.ndarray,
    meta: dict[str, Any],
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write `mu`, `sigma` (float64, checked by `check_stats`), `extra` arrays (ADM's `mu_s`/`sigma_s`,
    checked the same way; `pool_features`) and `meta` (JSON text, readable without pickle) to an npz;
    returns the path written (`stats_path`)."""
    p = stats_path(path)
    mu, sigma = check_stats(mu, sigma, f"the statistics for {p}")  # float64, as computed
    arrays = dict(extra or {})
    if "mu_s" in arrays:
        arrays["mu_s"], arrays["sigma_s"] = check_stats(
            arrays["mu_s"], arrays["sigma_s"], f"the spatial statistics for {p}"
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(p, "wb") as f:  # a full disk leaves no truncated npz under the final name
        np.savez(f, mu=mu, sigma=sigma, **arrays, meta=np.array(json.dumps(meta)))
    return p


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta` JSON that `save_stats` wrote, or {} for foreign files."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f["meta"])) if "meta" in f.files else {}
    except Exception:
        return {}


def ref_protocol(path: str | os.PathLike) -> tuple[str | None, str]:
    """(mode, where that comes from) of a reference npz: its `meta`, else what its origin implies, else None.

    Foreign files carry no mode. Known origins: an ADM reference batch (it holds `arr_0`; made and read by
    ADM's TF evaluator = legacy_tensorflow), clean-fid's stats (`<name>_<mode>_<split>_<res>.npz`), U-ViT's
    `fid_stats_*.npz` (the paper measured its samples against them with pytorch-fid = legacy_pytorch).
    """
    meta = read_meta(path)
    if meta.get("mode"):
        return str(meta["mode"]), "recorded by `uvit fid ref`"
    name = Path(path).name.lower()
    for mode in ("legacy_tensorflow", "legacy_pytorch", "clean"):  # clean-fid's own naming
        if f"_{mode}_" in name:
            return mode, "clean-fid's file name"
    try:
        with np.load(path, allow_pickle=False) as f:
            adm = "arr_0" in f.files
    except Exception:
        adm = False
    if adm or name.startswith("virtual_"):
        return "legacy_tensorflow", "an ADM reference batch (ADM's evaluator runs the TF Inception graph)"
    if name.startswith("fid_stats_"):
        return "legacy_pytorch", "U-ViT's fid_stats (the paper's FIDs use pytorch-fid, tools/fid_score.py)"
    return None, "unknown"
