"""Inception features -> streamed statistics: per-mode preprocessing, batching, GPU, torchrun sharding."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor

from uvit_cli.config import FidMode
from uvit_cli.errors import DataError
from uvit_cli.fid.images import ImageFiles, collate
from uvit_cli.fid.stats import FeatureStats
from uvit_cli.workers import worker_loader

MODES: tuple[str, ...] = get_args(FidMode)  # clean, legacy_pytorch, legacy_tensorflow
# features(x) with x (B, 3, H, W) float32 in [0, 255] after the mode's CPU resize -> (B, D)
FeatureFn = Callable[[Tensor], Tensor]
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


def inception_features(model: torch.nn.Module, mode: str) -> FeatureFn:
    """Wrap the FID Inception with the mode's in-network preprocessing (what clean-fid's extractors do)."""
    from uvit_cli.inception import tf_bilinear_resize

    def clean(x: Tensor) -> Tensor:
        assert x.shape[-2:] == (299, 299), x.shape
        return model((x - 128) / 128)

    def legacy_tf(x: Tensor) -> Tensor:  # NVIDIA's TorchScript forward: TF bilinear resize inside the net
        return model((tf_bilinear_resize(x) - 128) / 128)

    def legacy_pt(x: Tensor) -> Tensor:  # pytorch-fid: [0,1] -> [-1,1]
        return model(2 * (x / 255) - 1)

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
        if self.sum is None:
            self.sum, self.outer = f.sum(0), f.T @ f
        else:
            self.sum += f.sum(0)
            self.outer += f.T @ f
        self.n += f.shape[0]

    def result(self, dim: int) -> FeatureStats:
        if self.sum is None:
            return FeatureStats.empty(dim)
        return FeatureStats(self.n, self.sum.cpu().numpy(), self.outer.cpu().numpy())


def rank_world() -> tuple[int, int]:
    """(rank, world size) when torchrun started a process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_stats(stats: FeatureStats, device: torch.device) -> FeatureStats:
    """Sum every rank's (n, sum x, sum x xᵀ): the merged stats equal the single-process ones."""
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return stats
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([float(stats.n)], dtype=torch.float64, device=dev)
    s = torch.from_numpy(stats.sum).to(dev)
    o = torch.from_numpy(stats.sum_outer).to(dev)
    for t in (n, s, o):
        dist.all_reduce(t)
    return FeatureStats(int(n.item()), s.cpu().numpy(), o.cpu().numpy())


def folder_stats(
    files: list[Path],
    features: FeatureFn,
    mode: str,
    device: torch.device,
    batch_size: int = 50,
    workers: int = 0,
    progress: Progress | None = None,
    dim: int = 2048,
) -> tuple[FeatureStats, set[tuple[int, int]]]:
    """Statistics of this rank's slice of `files` (rank r takes files[r::world]); also the image sizes seen."""
    rank, world = rank_world()
    mine = files[rank::world]
    loader = worker_loader(
        ImageFiles(mine, cpu_resizer(mode)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    acc, sizes, done = _Accumulator(), set(), 0
    with torch.inference_mode(), exact_fp32():
        for x, batch_sizes, error in loader:
            sizes.update(batch_sizes)
            if error:
                raise DataError(error)
            if mode == "legacy_tensorflow" and len(sizes) > 1:
                # No resize outside the network here, so a batch needs one size; we demand one per run.
                raise DataError(f"legacy_tensorflow needs images of one size, found {sorted(sizes)[:3]}")
            acc.add(features(x.to(device, non_blocking=True)))
            done += len(batch_sizes)
            if progress is not None:
                progress(done * world, len(files))
    return acc.result(dim), sizes


def batches_stats(
    batches: Iterable[Any],
    features: FeatureFn,
    mode: str,
    device: torch.device,
    progress: Progress | None = None,
    total: int | None = None,
    dim: int = 2048,
) -> tuple[FeatureStats, set[tuple[int, int]]]:
    """Statistics of a stream of uint8 (B, H, W, 3) batches (numpy or torch), resized per image like files."""
    resize = cpu_resizer(mode)
    acc, sizes, done = _Accumulator(), set(), 0
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
            acc.add(features(x.to(device)))
            done += len(arr)
            if progress is not None:
                progress(done, total)
    return acc.result(dim), sizes
