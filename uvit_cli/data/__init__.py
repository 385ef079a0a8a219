"""Prepared data: the shard format, its one writer, its checks, and what training reads.

format.py    the on-disk layout (manifest, shard directories), one shard's write and read
writer.py    ShardSetWriter: how every producer writes and resumes a shard set; write_arrays
check.py     the cheap start-up check (presence, sizes) and the full sha256 verification
dataset.py   FeatureDataset (a prepared split, memory-mapped, fetched a batch at a time) and to_model
sampler.py   ResumableSampler (the seeded, resumable training order), make_loader, TimedBatches
seeds.py     deterministic picks from (seed, epoch, index)
"""

from uvit_cli.data.check import verify
from uvit_cli.data.dataset import FeatureDataset, to_model
from uvit_cli.data.format import (
    FORMAT_VERSION,
    MANIFEST,
    ShardData,
    list_shards,
    new_manifest,
    read_manifest,
    read_shard_meta,
    remove_temporaries,
    shard_name,
    to_storage,
    write_shard,
)
from uvit_cli.data.sampler import ResumableSampler, TimedBatches, collate, make_loader
from uvit_cli.data.seeds import choose, choose_many
from uvit_cli.data.writer import ShardSetWriter, write_arrays

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "FeatureDataset",
    "ResumableSampler",
    "ShardData",
    "ShardSetWriter",
    "TimedBatches",
    "choose",
    "choose_many",
    "collate",
    "list_shards",
    "make_loader",
    "new_manifest",
    "read_manifest",
    "read_shard_meta",
    "remove_temporaries",
    "shard_name",
    "to_model",
    "to_storage",
    "verify",
    "write_arrays",
    "write_shard",
]
