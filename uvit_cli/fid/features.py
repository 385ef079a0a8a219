"""Inception features -> streamed statistics: per-mode preprocessing, batching, GPU, torchrun sharding, and
the `Collector` that keeps, from the same pass, what the other metrics need."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor

from uvit_cli.config import FidMode
from uvit_cli.errors import DataError
from uvit_cli.fid.images import ImageFiles, collate
from uvit_cli.fid.metrics import (
    IS_SPLIT,
    ClipScoreFn,
    ISChunks,
    needs_logits,
    needs_pool_features,
    needs_spatial,
)
from uvit_cli.fid.stats import FeatureStats
from uvit_cli.workers import worker_loader

MODES: tuple[str, ...] = get_args(FidMode)  # clean, legacy_pytorch, legacy_tensorflow
# features(x) with x (B, 3, H, W) float32 in [0, 255] after the mode's CPU resize -> (B, D) pool features,
# or a dict of them: {"pool": (B, D), "spatial": (B, D_s), "logits": (B, K)} (FIDInception.outputs)
FeatureFn = Callable[[Tensor], Any]
# progress(images done, total or None)
Progress = Callable[[int, "int | None"], None]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise DataError(f"unknown FID mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def cpu_resizer(mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's own resize for the mode (PIL float bicubic / torch bilinear / none), HWC uint8 -> HWC."""
    from cleanfid.resize import build_resizer

    return build_resizer(check_mode(mode))


def inception_features(
    model: torch.nn.Module, mode: str, *, spatial: bool = False, logits: bool = False
) -> FeatureFn:
    """Wrap the FID Inception with the mode's in-network preprocessing (what clean-fid's extractors do).
    The function returns the pool features (B, 2048), or with `spatial`/`logits` the dict of
    `FIDInception.outputs` (pool, sFID's spatial features, the Inception Score's logits) of one forward."""
    from uvit_cli.inception import tf_bilinear_resize

    def net(x: Tensor) -> Any:
        if spatial or logits:
            return model.outputs(x, spatial=spatial, logits=logits)  # type: ignore[operator]
        return model(x)

    def clean(x: Tensor) -> Any:
        assert x.shape[-2:] == (299, 299), x.shape
        return net((x - 128) / 128)

    def legacy_tf(x: Tensor) -> Any:  # NVIDIA's TorchScript forward: TF bilinear resize inside the net
        return net((tf_bilinear_resize(x) - 128) / 128)

    def legacy_pt(x: Tensor) -> Any:  # pytorch-fid: [0,1] -> [-1,1]
        return net(2 * (x / 255) - 1)

    return {"clean": clean, "legacy_tensorflow": legacy_tf, "legacy_pytorch": legacy_pt}[check_mode(mode)]


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off while extracting: FID must not depend on the GPU generation (and no bf16 for Inception)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class _Accumulator:
    """Sums on the extraction device in float64 (one (D,D) matmul per batch)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, feats: Tensor) -> None:
        f = feats.detach().to(torch.float64)
        if self.sum is None or self.outer is None:
            self.sum, self.outer = f.sum(0), f.T @ f
        else:
            self.sum += f.sum(0)
            self.outer += f.T @ f
        self.n += f.shape[0]

    def result(self, dim: int) -> FeatureStats:
        if self.sum is None or self.outer is None:
            return FeatureStats.empty(dim)
        return FeatureStats(self.n, self.sum.cpu().numpy(), self.outer.cpu().numpy())


@dataclass
class Collected:
    """Everything the requested metrics need from one pass over the images, merged over ranks."""

    spatial: FeatureStats | None = None  # sFID
    is_chunks: ISChunks | None = None  # Inception Score
    pool_features: np.ndarray | None = None  # (N, 2048) float32 in image-index order: precision/recall
    clip: tuple[float, int] | None = None  # (sum of CLIP scores, images)


class Collector:
    """One pass, every metric: the feature function's outputs of each batch go to running sums (pool for FID,
    spatial for sFID), per-chunk Inception Score sums, the kept pool features (precision/recall) and the CLIP
    score sums. Images carry their global index (ADM's order), which places them in IS chunks and orders the
    kept features; ranks merge in `merged`."""

    def __init__(
        self,
        metrics: Sequence[str] = ("fid",),
        *,
        clip: ClipScoreFn | None = None,
        prompts: Callable[[Sequence[int]], list[str]] | None = None,
    ) -> None:
        self.metrics = tuple(metrics)
        self.pool = _Accumulator()
        self.spatial = _Accumulator() if needs_spatial(metrics) else None
        self.is_sums: list[Tensor] | None = [] if needs_logits(metrics) else None  # count, sum p, sum p log p
        self.kept: list[np.ndarray] = []
        self.kept_index: list[np.ndarray] = []
        self.keep = needs_pool_features(metrics)
        self.clip_fn, self.prompts = (clip, prompts) if "clip" in metrics else (None, None)
        if "clip" in metrics and (clip is None or prompts is None):
            raise DataError("--metrics clip needs a CLIP scorer and the prompts of the images")
        self.clip_sum, self.clip_n = 0.0, 0

    @property
    def wants_images(self) -> bool:
        """Whether `add` needs the uint8 images themselves (CLIP scores them at their own size)."""
        return self.clip_fn is not None

    def add(self, out: Tensor | dict[str, Tensor], index: np.ndarray, images: Any = None) -> None:
        """`out`: the feature function's (B, D) pool features, or its dict (`pool`, `spatial`, `logits`);
        `index` (B,): the images' global indices; `images`: uint8 (B, H, W, 3) when `wants_images`."""
        outs = out if isinstance(out, dict) else {"pool": out}
        need = ["pool"] + ["spatial"] * (self.spatial is not None) + ["logits"] * (self.is_sums is not None)
        missing = [k for k in need if k not in outs]
        if missing:
            raise DataError(
                f"the feature function gave no {', '.join(missing)} output, which these metrics need"
            )
        self.pool.add(outs["pool"])
        if self.spatial is not None:
            self.spatial.add(outs["spatial"])
        if self.is_sums is not None:
            self._add_is(outs["logits"], index)
        if self.keep:
            self.kept.append(outs["pool"].detach().to("cpu", torch.float32).numpy())
            self.kept_index.append(np.asarray(index, np.int64))
        if self.clip_fn is not None and self.prompts is not None:
            scores = np.asarray(self.clip_fn(list(images), self.prompts(index.tolist())), np.float64)
            self.clip_sum += float(scores.sum())
            self.clip_n += len(scores)

    def _add_is(self, logits: Tensor, index: np.ndarray) -> None:
        p = torch.softmax(logits.detach().to(torch.float64), 1)  # (B, 1008)
        chunk = torch.as_tensor(index // IS_SPLIT, device=p.device)
        rows = int(chunk.max()) + 1
        sums = self.is_sums
        assert sums is not None
        if not sums:
            sums += [p.new_zeros(0), p.new_zeros(0, p.shape[1]), p.new_zeros(0)]
        if rows > sums[0].shape[0]:  # grow to the highest chunk seen
            grow = rows - sums[0].shape[0]
            sums[0] = torch.cat([sums[0], p.new_zeros(grow)])
            sums[1] = torch.cat([sums[1], p.new_zeros(grow, p.shape[1])])
            sums[2] = torch.cat([sums[2], p.new_zeros(grow)])
        sums[0].index_add_(0, chunk, torch.ones_like(chunk, dtype=p.dtype))
        sums[1].index_add_(0, chunk, p)
        sums[2].index_add_(0, chunk, torch.special.xlogy(p, p).sum(1))  # 0 log 0 = 0

    def merged(self, device: torch.device, dim: int) -> Collected:
        """The metrics' state summed (or gathered) over torchrun ranks; identical on every rank."""
        out = Collected()
        if self.spatial is not None:
            local = self.spatial.result(0) if self.spatial.sum is not None else None
            out.spatial = _all_reduce_feature_stats(local, device)
        if self.is_sums is not None:
            out.is_chunks = _all_reduce_is(self.is_sums, device)
        if self.keep:
            out.pool_features = _all_gather_rows(self.kept, self.kept_index, device, dim)
        if self.clip_fn is not None:
            total, n = _all_reduce_floats([self.clip_sum, float(self.clip_n)], device)
            out.clip = (total, int(n))
        return out


def rank_world() -> tuple[int, int]:
    """(rank, world size) when torchrun started a process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_device(device: torch.device) -> torch.device:
    import torch.distributed as dist

    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_stats(stats: FeatureStats, device: torch.device) -> FeatureStats:
    """Sum every rank's (n, sum x, sum x xᵀ): the merged stats equal the single-process ones."""
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return stats
    dev = _reduce_device(device)
    n = torch.tensor([float(stats.n)], dtype=torch.float64, device=dev)
    s = torch.from_numpy(stats.sum).to(dev)
    o = torch.from_numpy(stats.sum_outer).to(dev)
    for t in (n, s, o):
        dist.all_reduce(t)
    return FeatureStats(int(n.item()), s.cpu().numpy(), o.cpu().numpy())


def _all_reduce_feature_stats(stats: FeatureStats | None, device: torch.device) -> FeatureStats:
    """`all_reduce_stats` for statistics a rank may not have (no images there: its dimension is unknown)."""
    dim = int(_all_reduce_floats([float(stats.dim if stats else 0)], device, op="max")[0])
    return all_reduce_stats(stats if stats is not None else FeatureStats.empty(dim), device)


def _all_reduce_floats(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _all_reduce_is(sums: list[Tensor], device: torch.device) -> ISChunks:
    """Per-chunk Inception Score sums added over ranks (a rank may have seen fewer chunks, or none)."""
    import torch.distributed as dist

    shape = [float(sums[1].shape[0]), float(sums[1].shape[1])] if sums else [0.0, 0.0]
    rows, width = (int(v) for v in _all_reduce_floats(shape, device, op="max"))
    world = rank_world()[1]
    dev = _reduce_device(device) if world > 1 else torch.device("cpu")
    full = [torch.zeros(rows, dtype=torch.float64, device=dev) for _ in range(3)]
    full[1] = torch.zeros(rows, width, dtype=torch.float64, device=dev)
    for f, part in zip(full, sums, strict=False):  # count, sum p, sum p log p
        f[: part.shape[0]] = part.to(dev)
    if world > 1:
        for f in full:
            dist.all_reduce(f)
    count, sum_p, sum_plogp = (f.cpu().numpy() for f in full)
    return ISChunks(count, sum_p, sum_plogp)


def _all_gather_rows(
    parts: list[np.ndarray], index: list[np.ndarray], device: torch.device, dim: int
) -> np.ndarray:
    """Every rank's kept rows, concatenated and put in global-index order (N, dim) float32."""
    import torch.distributed as dist

    rows = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    idx = np.concatenate(index) if index else np.zeros(0, np.int64)
    _, world = rank_world()
    if world > 1:
        dev = _reduce_device(device)
        counts = torch.tensor([len(idx)], dtype=torch.int64, device=dev)
        all_counts = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts)
        most = max(int(c.item()) for c in all_counts)
        pad_rows = torch.zeros(most, rows.shape[1], dtype=torch.float32, device=dev)
        pad_rows[: len(idx)] = torch.from_numpy(rows).to(dev)
        pad_idx = torch.zeros(most, dtype=torch.int64, device=dev)
        pad_idx[: len(idx)] = torch.from_numpy(idx).to(dev)
        got_rows = [torch.zeros_like(pad_rows) for _ in range(world)]
        got_idx = [torch.zeros_like(pad_idx) for _ in range(world)]
        dist.all_gather(got_rows, pad_rows)
        dist.all_gather(got_idx, pad_idx)
        rows = np.concatenate(
            [r[: int(c.item())].cpu().numpy() for r, c in zip(got_rows, all_counts, strict=True)]
        )
        idx = np.concatenate(
            [i[: int(c.item())].cpu().numpy() for i, c in zip(got_idx, all_counts, strict=True)]
        )
    return rows[np.argsort(idx, kind="stable")]


def folder_stats(
    files: list[Path],
    features: FeatureFn,
    mode: str,
    device: torch.device,
    batch_size: int = 50,
    workers: int = 0,
    progress: Progress | None = None,
    dim: int = 2048,
    *,
    collector: Collector | None = None,
) -> tuple[FeatureStats, set[tuple[int, int]]]:
    """Statistics of this rank's slice of `files` (rank r takes files[r::world], image i of the list having
    index i); also the image sizes seen. Whatever else the metrics need goes to `collector`."""
    rank, world = rank_world()
    mine = files[rank::world]
    index = np.arange(rank, len(files), world)
    col = collector or Collector()
    loader = worker_loader(
        ImageFiles(mine, cpu_resizer(mode), keep_original=col.wants_images),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    sizes: set[tuple[int, int]] = set()
    done = 0
    with torch.inference_mode(), exact_fp32():
        for x, batch_sizes, error, originals in loader:
            sizes.update(batch_sizes)
            if error:
                raise DataError(error)
            if mode == "legacy_tensorflow" and len(sizes) > 1:
                # No resize outside the network here, so a batch needs one size; we demand one per run.
                raise DataError(f"legacy_tensorflow needs images of one size, found {sorted(sizes)[:3]}")
            b = len(batch_sizes)
            col.add(features(x.to(device, non_blocking=True)), index[done : done + b], originals)
            done += b
            if progress is not None:
                progress(done * world, len(files))
    return col.pool.result(dim), sizes


def batches_stats(
    batches: Iterable[Any],
    features: FeatureFn,
    mode: str,
    device: torch.device,
    progress: Progress | None = None,
    total: int | None = None,
    dim: int = 2048,
    *,
    collector: Collector | None = None,
    indices: Iterable[int] | None = None,
) -> tuple[FeatureStats, set[tuple[int, int]]]:
    """Statistics of a stream of uint8 (B, H, W, 3) batches (numpy or torch), resized per image like files.

    `indices`: the global index of each image in stream order (default rank, rank + world, ...: the share
    `fid_of_model` generates); they place images in Inception Score chunks and order kept features."""
    resize = cpu_resizer(mode)
    rank, world = rank_world()
    order = iter(indices) if indices is not None else itertools.count(rank, world)
    col = collector or Collector()
    sizes: set[tuple[int, int]] = set()
    done = 0
    with torch.inference_mode(), exact_fp32():
        for batch in batches:
            arr = batch.cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise DataError(f"image batches must be uint8 (B, H, W, 3), got {arr.dtype} {arr.shape}")
            sizes.add(arr.shape[1:3])
            if mode == "legacy_tensorflow" and len(sizes) > 1:
                raise DataError(f"legacy_tensorflow needs images of one size, found {sorted(sizes)[:3]}")
            if mode == "legacy_tensorflow":
                x = torch.from_numpy(arr.transpose(0, 3, 1, 2).astype(np.float32))
            else:
                x = torch.from_numpy(
                    np.stack([np.asarray(resize(im), np.float32) for im in arr]).transpose(0, 3, 1, 2)
                )
            index = np.fromiter(itertools.islice(order, len(arr)), np.int64, len(arr))
            col.add(features(x.to(device)), index, arr)
            done += len(arr)
            if progress is not None:
                progress(done, total)
    return col.pool.result(dim), sizes
