"""The training order (a seeded global permutation per epoch, cut into global batches, resumable
mid-epoch) and the DataLoader `uvit train` and `uvit bench data` build on it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from uvit_cli.data.seeds import M64, splitmix64
from uvit_cli.errors import DataError
from uvit_cli.workers import worker_loader


class ResumableSampler(Sampler):
    """This rank's share of a seeded global permutation, cut into global batches.

    Global batch b of epoch e is `perm_e[b * B:(b + 1) * B]` (B = global batch size) whatever the number of
    ranks; rank r gets its contiguous 1/world slice. The tail that does not fill a global batch is dropped.
    `start_batch` skips batches already trained on, so a resumed run sees exactly the same data.
    With `with_epoch`, yields `(index, epoch)` pairs (see FeatureDataset).
    """

    def __init__(
        self,
        length: int,
        global_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        with_epoch: bool = False,
    ) -> None:
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if length < global_batch:
            raise DataError(f"the data set has {length} items, fewer than one batch of {global_batch}")
        self.length, self.global_batch, self.seed = length, global_batch, seed
        self.rank, self.world_size, self.with_epoch = rank, world_size, with_epoch
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.length // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(splitmix64((self.seed & M64) ^ splitmix64(epoch)) >> 1)
        return torch.randperm(self.length, generator=g)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * (self.global_batch // self.world_size)

    def __iter__(self) -> Iterator[Any]:
        perm = self.permutation(self.epoch)
        per_rank = self.global_batch // self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            lo = b * self.global_batch + self.rank * per_rank
            for i in perm[lo : lo + per_rank].tolist():
                yield (i, self.epoch) if self.with_epoch else i


def collate(batch: Sequence[dict[str, torch.Tensor]] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch from `FeatureDataset.__getitems__` as it is; a list of `ds[i]` dicts stacked."""
    if isinstance(batch, dict):
        return batch
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def make_loader(
    ds: Dataset, sampler: ResumableSampler, batch_size: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    """The training loader: batches of `batch_size` keys fetched in one `__getitems__` call each (storage
    dtype, converted on the device by `to_model`), in the sampler's order. Workers persist across epochs:
    every key carries its epoch, so nothing in a worker depends on `set_epoch`."""
    return worker_loader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=False,  # the sampler yields whole global batches; batch_size divides a rank's share
        persistent_workers=num_workers > 0,
    )


class TimedBatches:
    """The loader's batches epoch after epoch, from global batch `start_batch` of `epoch`, adding the
    seconds spent waiting for each one to `waited` (what `uvit train` logs as `data_wait_ms`)."""

    def __init__(
        self, loader: DataLoader, sampler: ResumableSampler, epoch: int = 0, start_batch: int = 0
    ) -> None:
        self.loader, self.sampler, self.waited = loader, sampler, 0.0
        self._batches = self._epochs(epoch, start_batch)

    def _epochs(self, epoch: int, start_batch: int) -> Iterator[Any]:
        while True:
            self.sampler.set_epoch(epoch, start_batch)
            yield from self.loader
            epoch, start_batch = epoch + 1, 0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        batch = next(self._batches)
        self.waited += time.perf_counter() - t0
        return batch
