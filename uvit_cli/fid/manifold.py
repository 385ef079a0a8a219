"""Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them (k = 3).

Each set's manifold is the union of balls around its points, a point's radius being its squared L2
distance to its k-th nearest neighbour in its own set (the (k+1)-th smallest distance of its row, which
holds the point itself). Precision: the share of samples inside the reference manifold; recall: the share
of reference points inside the sample manifold. "Inside" is `distance <= radius` of some point.

ADM computes every distance block in float16 (features cast to float16; each operation of
max(|u|² - 2 u·v + |v|², 0) rounded to float16) and falls back to float32 for a block (PR_BLOCK x PR_BLOCK)
with a non-finite value. We do the same: float16 values, each operation rounded as TF rounds it, the sums
of products accumulated in float64 before the rounding (TF accumulates half-precision matmuls and
reductions in float32; float64 makes the rounding the same on every device). Radii and distances are then
exact float16 numbers, so the comparisons are those ADM makes. `float16=False` gives the float32 numbers
(the metric's own definition without ADM's rounding).

Memory is bounded by the blocks: a PR_BLOCK x PR_BLOCK distance block (float32) and the running k+1
smallest distances per row, whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from uvit_cli.fid.metrics import PR_BLOCK, PR_K

# Rows of a block computed at once in float64 (the rounding path): 1024 x PR_BLOCK x 8 bytes = 80 MB.
_SUB_ROWS = 1024


def _f16(x: Tensor) -> Tensor:
    """Round to float16 the way a float32 result is cast (float64 -> float32 -> float16), kept as float32."""
    return x.to(torch.float32).to(torch.float16).to(torch.float32)


def _norms16(u16: Tensor) -> Tensor:
    """tf.reduce_sum(tf.square(U), 1) in float16: each square rounded, the sum rounded once."""
    return _f16((_f16(u16 * u16)).to(torch.float64).sum(1))


def _distances16(u16: Tensor, v16: Tensor, nu: Tensor, nv: Tensor) -> Tensor:
    """max(fp16(fp16(|u|² - 2 fp16(u·v)) + |v|²), 0) for float16-valued rows u (a, D) and v (b, D)."""
    out = torch.empty(u16.shape[0], v16.shape[0], dtype=torch.float32, device=u16.device)
    vt = v16.to(torch.float64).T
    for i in range(0, u16.shape[0], _SUB_ROWS):
        mm = _f16(u16[i : i + _SUB_ROWS].to(torch.float64) @ vt)  # (a', b)
        d = _f16(nu[i : i + _SUB_ROWS, None] - 2 * mm)
        out[i : i + _SUB_ROWS] = _f16(d + nv[None, :]).clamp_min_(
            0.0
        )  # NaN stays NaN: it triggers the fallback
    return out


def _distances32(u: Tensor, v: Tensor) -> Tensor:
    """max(|u|² - 2 u·v + |v|², 0) of float32 features, computed in float64 and rounded to float32."""
    u64, v64 = u.to(torch.float64), v.to(torch.float64)
    d = (u64 * u64).sum(1)[:, None] - 2 * (u64 @ v64.T) + (v64 * v64).sum(1)[None, :]
    return d.clamp_min_(0.0).to(torch.float32)


class _Distances:
    """Distance blocks between row and column sets, ADM's way (float16 with a float32 fallback per block)."""

    def __init__(self, float16: bool) -> None:
        self.float16 = float16
        self.fallbacks = 0  # blocks that were not finite in float16

    def __call__(self, u: Tensor, v: Tensor) -> Tensor:
        if self.float16:
            u16, v16 = _f16(u), _f16(v)
            d = _distances16(u16, v16, _norms16(u16), _norms16(v16))
            if bool(torch.isfinite(d).all()):
                return d
            self.fallbacks += 1
        return _distances32(u, v)


def manifold_radii(
    feats: Tensor, *, k: int = PR_K, block: int = PR_BLOCK, distances: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """(N,) squared distance of each row to its k-th nearest other row: the (k+1)-th smallest of its row of
    distances to every row, itself included (ADM's `np.partition(..., k)[:, k]`), kept across column blocks."""
    n = feats.shape[0]
    radii = torch.empty(n, dtype=torch.float32, device=feats.device)
    for r in range(0, n, block):
        rows = feats[r : r + block]
        best = torch.empty(rows.shape[0], 0, dtype=torch.float32, device=feats.device)
        for c in range(0, n, block):
            cand = torch.cat([best, distances(rows, feats[c : c + block])], 1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        if best.shape[1] < k + 1:
            raise ValueError(f"precision/recall with k = {k} needs more than {k} images per set, got {n}")
        radii[r : r + block] = best[:, k]
    return radii


def precision_recall(
    ref: np.ndarray | Tensor,
    samples: np.ndarray | Tensor,
    *,
    k: int = PR_K,
    block: int = PR_BLOCK,
    float16: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[float, float, int]:
    """(precision, recall, float16 blocks that fell back to float32) of pool features `samples` (N, D)
    against `ref` (M, D): ADM's `compute_prec_recall(ref_acts, sample_acts)`."""
    dev = torch.device(device)
    r, s = (torch.as_tensor(x).to(dev, torch.float32) for x in (ref, samples))
    distances = _Distances(float16)
    with torch.inference_mode():
        radii_r = manifold_radii(r, k=k, block=block, distances=distances)
        radii_s = manifold_radii(s, k=k, block=block, distances=distances)
        ref_in = torch.zeros(r.shape[0], dtype=torch.bool, device=dev)  # inside the samples' manifold
        sample_in = torch.zeros(s.shape[0], dtype=torch.bool, device=dev)  # inside the reference's
        for i in range(0, r.shape[0], block):
            for j in range(0, s.shape[0], block):
                d = distances(r[i : i + block], s[j : j + block])  # (a, b): reference rows, sample columns
                ref_in[i : i + block] |= (d <= radii_s[None, j : j + block]).any(1)
                sample_in[j : j + block] |= (d <= radii_r[i : i + block, None]).any(0)
    precision = float(sample_in.to(torch.float64).mean())
    recall = float(ref_in.to(torch.float64).mean())
    return precision, recall, distances.fallbacks
