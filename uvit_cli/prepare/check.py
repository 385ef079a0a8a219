"""What a prepare run is checked against before it writes: the settings its shards are fingerprinted with,
the digest of its source listing, what the sources of finished shards hash to now, and its peak memory
and the disk bytes it adds (refused in one line when they cannot fit, through `resources`)."""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uvit_cli import data, resources
from uvit_cli.data.writer import SourceDigests
from uvit_cli.prepare.sources import Source, source_sha256

if TYPE_CHECKING:
    import torch

    from uvit_cli.prepare.run import PrepareSpec, SplitJob, _Encoders


def settings(spec: PrepareSpec, vae_sha: str | None, clip_sha: str | None) -> dict[str, Any]:
    """What the shards depend on, recorded in the manifest: a rerun with other settings is refused."""
    return {
        "format_version": data.FORMAT_VERSION,
        "kind": spec.kind,
        "space": spec.space,
        "resolution": spec.resolution,
        "crop": spec.crop,
        "flip": spec.flip,
        "conditioning": spec.conditioning,
        "classes": spec.classes,
        "dtype": spec.dtype if spec.space == "latent" else "uint8",
        "items_per_shard": spec.items_per_shard,
        "vae_sha256": vae_sha,
        "clip_sha256": clip_sha,
        "vae_precision": spec.precision if spec.space == "latent" else None,
    }


def source_digest(sources: list[Source]) -> str:
    """A hash of a split's listing (keys, labels, captions); `ShardSetWriter.check_splits` refuses a changed one."""
    rows = [(s.key, s.label, s.captions) for s in sources]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def digests_now(job: SplitJob, items_per_shard: int, pool: ThreadPoolExecutor) -> SourceDigests:
    """What the sources of shard k hash to now, for `ShardSetWriter.todo` to compare with its record."""

    def digests(k: int) -> list[tuple[str, str]]:
        part = job.sources[k * items_per_shard : (k + 1) * items_per_shard]
        return [(src.path, d) for src, d in zip(part, pool.map(source_sha256, part), strict=True)]

    return digests


# Peak memory of the autoencoder's encoder on the CPU: per image about 6 float32 maps of its first width at
# full resolution, the mid-block attention weights ((h*w)^2 floats at 1/8 resolution) included, plus about
# 60 MiB of kernel workspace (measured with `ru_maxrss`, ch=32 and 128, 1-8 images of 128 and 256 px:
# 6.1 maps at 256 px). Planned with margin: 7 maps and 3 copies of the attention weights.
_VAE_MAPS = 7
_ATTENTION_COPIES = 3
_VAE_WORKSPACE = 64 << 20
_PREFETCH = 4  # batches each decoding worker keeps ready (DataLoader prefetch_factor)


def require_resources(
    out: Path, spec: PrepareSpec, jobs: list[SplitJob], enc: _Encoders, device: torch.device
) -> None:
    """Refuse, before anything is written, a run whose peak memory or the shard bytes it adds cannot fit.

    The peak is one shard's buffer (features as computed, plus the stacked and stored copies), the decoded
    batches in flight, and on the CPU the encoders' activations; it does not grow with the number of images.
    """
    S, R, views = spec.items_per_shard, spec.resolution, 2 if spec.flip else 1
    pixel = spec.space == "pixel"
    stored = 1 if pixel else np.dtype(spec.dtype).itemsize
    feat = views * (3 * R * R if pixel else 8 * (R // 8) ** 2)  # values per item
    ctx = 0  # values per caption
    if enc.clip is not None:
        ctx = enc.clip.config.max_position_embeddings * enc.clip.config.hidden_size
    shard_peak, disk = 0, 0
    for job in jobs:
        present = set(data.list_shards(out / job.name))
        for k in range(math.ceil(len(job.sources) / S)):
            part = job.sources[k * S : (k + 1) * S]
            caps = sum(len(s.captions or []) for s in part) if ctx else 0
            rows = len(part) * feat * (2 if pixel else 4 + 4 + stored)  # computed, stacked, stored
            shard_peak = max(shard_peak, rows + caps * ctx * (4 + 2 * stored))
            if k not in present:  # x, y, context offsets and keys, contexts
                disk += len(part) * (feat * stored + 8 + 8 + 64) + caps * ctx * stored
    batch = min(spec.batch_size, S, max(len(j.sources) for j in jobs))
    in_flight = (spec.num_workers or 0) * _PREFETCH + 1
    decode = in_flight * batch * 3 * R * R * 3  # the crop, its resize and the batch
    encode = 0
    if device.type == "cpu":
        if enc.vae is not None:
            maps = _VAE_MAPS * enc.vae.encoder.conv_in.out_channels * R * R  # its first width
            encode = batch * views * 4 * (maps + _ATTENTION_COPIES * (R // 8) ** 4) + _VAE_WORKSPACE
        if enc.clip is not None:
            encode = max(encode, spec.text_batch_size * ctx * 4 * 8)
    resources.require_memory(
        f"preparing {out} ({R} px, {S} items per shard, batches of {batch})",
        shard_peak + decode + encode,
        fix="use a smaller --resolution, --items-per-shard or --batch-size (or fewer --workers)",
    )
    resources.require_disk(
        out, "the shards still to write", disk, fix="free space, or choose another --out on a larger disk"
    )


def precision_warning(precision: str) -> str | None:
    """Why `precision` is a poor choice on this machine, else None (measured: bf16 convolutions on a CPU
    are ~140x slower than fp32)."""
    import torch

    if precision == "bf16" and not torch.cuda.is_available():
        return (
            "--precision bf16 without a GPU: CPU bf16 convolutions are far slower than fp32 "
            "(use the default fp32 here)"
        )
    return None
