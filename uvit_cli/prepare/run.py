"""The prepare engine: decode in DataLoader workers, encode in batches, write shards, assemble the manifest.

Resumable by construction (`data.ShardSetWriter`): shard k covers sources [k*S, (k+1)*S), a finished
shard whose files still hash to what was recorded is kept, anything missing or damaged is made again,
and rank r of W writes the shards k with k % W == r. Rank 0 writes the manifest: first as "incomplete"
(it holds the settings a rerun is checked against), then complete once every shard of the split exists.

Each shard records a digest of every source it covers (`sources.source_sha256`: the bytes the decode
worker decoded, with the key, label and captions); a rerun hashes the sources of the finished shards
again, in threads, and refuses if any changed. Before anything is written, the run's peak memory and
the bytes it will add on disk are estimated and refused in one line if they cannot fit (`check`).
"""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from uvit_cli import data, dist
from uvit_cli.errors import DataError, ResourceError
from uvit_cli.imageio import decode_rgb, read_regular
from uvit_cli.prepare import check
from uvit_cli.prepare.check import source_digest
from uvit_cli.prepare.result import PrepareResult, Progress, ProgressFn
from uvit_cli.prepare.sources import CROP_DESCRIPTIONS, CROPS, Source, source_sha256
from uvit_cli.workers import worker_loader


@dataclass
class SplitJob:
    """One split to prepare: its sorted sources and what to compute from them."""

    name: str
    sources: list[Source]


@dataclass
class PrepareSpec:
    """Everything that determines the shards (fingerprinted), plus how to run (not fingerprinted)."""

    kind: str
    space: str  # "latent" | "pixel"
    resolution: int
    crop: str  # "lanczos" | "adm"
    flip: bool  # also store the horizontally flipped view
    conditioning: str  # "none" | "class" | "text"
    classes: list[str] | None = None
    dtype: str = "float16"
    items_per_shard: int = 1000
    vae: str | None = None
    clip: str | None = None
    precision: str = "fp32"  # VAE encode: "fp32" or "bf16" autocast (CUDA)
    batch_size: int = 64
    num_workers: int | None = None  # image-decoding processes; None: min(8, CPUs)
    text_batch_size: int = 256

    @property
    def text(self) -> bool:
        """Captions are encoded (CLIP contexts stored beside the images)."""
        return self.conditioning == "text"

    @property
    def labels(self) -> bool:
        """Class labels are stored."""
        return self.conditioning == "class"

    def __post_init__(self) -> None:
        if self.num_workers is None:
            self.num_workers = min(8, os.cpu_count() or 1)
        if self.resolution < 8:
            raise DataError(f"--resolution {self.resolution}: an image side of at least 8 pixels")
        if self.space == "latent" and self.resolution % 8:
            raise DataError(
                f"--resolution {self.resolution} is not a multiple of 8 (the autoencoder downsamples by 8)"
            )


# --------------------------------------------------------------------------------------------------
# Decoding in workers


class _Decode(Dataset):
    """Source index -> (index, uint8 HWC image or None, error text, `source_sha256` of what was decoded)."""

    def __init__(self, sources: list[Source], crop: str, resolution: int) -> None:
        self.sources, self.resolution = sources, resolution
        self.crop = CROPS[crop]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str, str]:
        src = self.sources[i]
        if src.skip is not None:  # a named pipe, socket, device or broken link: never opened
            return i, None, f"{src.skip}, not a regular file: skipped unopened", source_sha256(src)
        raw = None
        try:
            if src.pixels is not None:
                image = Image.fromarray(src.pixels)
            else:
                raw = read_regular(src.path)  # the bytes hashed are the bytes decoded
                image = decode_rgb(raw)
            return i, self.crop(image, self.resolution), "", source_sha256(src, raw)
        except Exception as e:  # corrupt, truncated, unsupported, missing: skip and report, never crash
            return i, None, f"{type(e).__name__}: {str(e)[:200]}", source_sha256(src, raw)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


# --------------------------------------------------------------------------------------------------
# Encoding


class _Encoders:
    def __init__(self, spec: PrepareSpec, device: torch.device) -> None:
        from uvit_cli.encoders import load_autoencoder, load_text_encoder

        self.spec, self.device = spec, device
        self.vae = load_autoencoder(spec.vae, device=device) if spec.space == "latent" else None
        self.clip = load_text_encoder(spec.clip, device=device) if spec.text else None

    def ids(self) -> dict[str, Any]:
        enc: dict[str, Any] = {}
        if self.vae is not None:
            enc["autoencoder"] = {"path": self.vae.weights_path, "sha256": self.vae.weights_sha256}
        if self.clip is not None:
            enc["text"] = {"path": self.clip.weights_path, "sha256": self.clip.weights_sha256}
        return enc

    @torch.no_grad()
    def images(self, imgs: list[np.ndarray]) -> np.ndarray:
        """uint8 HWC images -> (B, V, C, h, w): float32 moments (latent) or uint8 CHW pixels (pixel)."""
        # NCHW contiguous as the official pipeline: a channels-last input picks other conv kernels (~2e-5 apart)
        x = (
            torch.from_numpy(np.stack(imgs)).to(self.device).permute(0, 3, 1, 2).contiguous()
        )  # (B, 3, H, W) u8
        if self.vae is None:
            views = [x, x.flip(-1)] if self.spec.flip else [x]
            return torch.stack(views, 1).cpu().numpy()
        x = x.float() / 127.5 - 1.0  # float32, as the official `arr / 127.5 - 1`
        if self.spec.flip:
            x = torch.cat([x, x.flip(-1)])  # (2B, 3, H, W): images then their mirror images
        use_bf16 = self.spec.precision == "bf16"
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with ctx:
            m = self.vae.encode_moments(x).float()  # (B·V, 8, h, w)
        b = len(imgs)
        m = torch.stack([m[:b], m[b:]], 1) if self.spec.flip else m[:, None]
        return m.cpu().numpy()

    @torch.no_grad()
    def texts(self, captions: list[str]) -> np.ndarray:
        assert self.clip is not None
        bs = self.spec.text_batch_size
        parts = [self.clip.encode(captions[i : i + bs]).float().cpu() for i in range(0, len(captions), bs)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, 77, 0), np.float32)


# --------------------------------------------------------------------------------------------------
# The run


class _ShardBuffer:
    def __init__(self, index: int, lo: int, hi: int) -> None:
        self.index, self.lo, self.hi = index, lo, hi
        self.rows: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.skipped: dict[int, str] = {}
        self.digests: dict[int, str] = {}

    @property
    def full(self) -> bool:
        return len(self.rows) + len(self.skipped) == self.hi - self.lo


def _finish_shard(
    buf: _ShardBuffer, sources: list[Source], spec: PrepareSpec, writer: data.ShardSetWriter, split: str
) -> dict[str, Any]:
    order = sorted(buf.rows)
    store = (lambda a: a) if spec.space == "pixel" else (lambda a: data.to_storage(a, spec.dtype))
    if order:
        x = store(np.stack([buf.rows[i][0] for i in order]))
    else:
        c = 3 if spec.space == "pixel" else 8
        f = 1 if spec.space == "pixel" else 8
        r = spec.resolution // f
        x = np.zeros((0, 2 if spec.flip else 1, c, r, r), np.uint8 if spec.space == "pixel" else spec.dtype)
    text = spec.text
    shard = data.ShardData(
        x=x,
        keys=[sources[i].key for i in order],
        sources=buf.hi - buf.lo,
        y=np.array([sources[i].label for i in order], np.int64) if spec.labels else None,
        contexts=[data.to_storage(buf.rows[i][1], spec.dtype) for i in order] if text else None,  # type: ignore[arg-type]
        captions=[list(sources[i].captions or []) for i in order] if text else None,
        skipped=[
            {"key": sources[i].key, "path": sources[i].path, "reason": r}
            for i, r in sorted(buf.skipped.items())
        ],
        source_sha256=[buf.digests[i] for i in range(buf.lo, buf.hi)],
    )
    return writer.write(split, buf.index, shard)


def _prepare_split(
    writer: data.ShardSetWriter,
    job: SplitJob,
    spec: PrepareSpec,
    enc: _Encoders,
    pending: list[int],
    progress: ProgressFn | None,
    reused: int,
) -> int:
    """Write this rank's pending shards of one split; returns how many were written."""
    S, N = spec.items_per_shard, len(job.sources)
    bufs = {k: _ShardBuffer(k, k * S, min((k + 1) * S, N)) for k in pending}
    owner = {i: k for k in pending for i in range(k * S, min((k + 1) * S, N))}
    # Batches never cross a shard and start at its first item: the encoder sees the same batches
    # whatever the number of ranks or where a resumed run starts (conv kernels depend on batch size).
    batches = [
        list(range(lo, min(lo + spec.batch_size, bufs[k].hi)))
        for k in pending
        for lo in range(bufs[k].lo, bufs[k].hi, spec.batch_size)
    ]
    workers = spec.num_workers or 0  # set by PrepareSpec (None there means min(8, CPUs))
    loader = worker_loader(
        _Decode(job.sources, spec.crop, spec.resolution),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_as_list,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    state = Progress(job.name, 0, len(owner), shards_reused=reused)
    if progress:
        progress(state)
    for batch in loader:
        ok = [(i, img) for i, img, _, _ in batch if img is not None]
        for i, img, err, digest in batch:
            bufs[owner[i]].digests[i] = digest
            if img is None:
                bufs[owner[i]].skipped[i] = err
                state.skipped += 1
            elif spec.text and not job.sources[i].captions:
                bufs[owner[i]].skipped[i] = "no captions"
                state.skipped += 1
        ok = [(i, img) for i, img in ok if i not in bufs[owner[i]].skipped]
        if ok:
            try:
                feats = enc.images([img for _, img in ok])  # (B, V, C, h, w)
            except torch.cuda.OutOfMemoryError:
                raise ResourceError(
                    f"the autoencoder ran out of GPU memory on a batch of {len(ok)} images at "
                    f"{spec.resolution} px: use a smaller --batch-size"
                ) from None
            ctx: list[np.ndarray | None] = [None] * len(ok)
            if spec.text:
                caps = [c for i, _ in ok for c in job.sources[i].captions or []]
                flat = enc.texts(caps)
                bounds = np.cumsum([0] + [len(job.sources[i].captions or []) for i, _ in ok])
                ctx = [flat[bounds[j] : bounds[j + 1]] for j in range(len(ok))]
            for (i, _), f, c in zip(ok, feats, ctx, strict=True):
                bufs[owner[i]].rows[i] = (f, c)
        state.done += len(batch)
        for k in sorted({owner[i] for i, _, _, _ in batch}):
            if k in bufs and bufs[k].full:
                _finish_shard(bufs.pop(k), job.sources, spec, writer, job.name)
                state.shards_written += 1
        if progress:
            progress(state)
    if bufs:  # cannot happen unless the loader dropped items
        raise DataError(
            f"{writer.out / job.name}: shards {sorted(bufs)} incomplete after the run; rerun the command"
        )
    return state.shards_written


def run(
    out: str | os.PathLike[str],
    spec: PrepareSpec,
    jobs: list[SplitJob],
    progress: ProgressFn | None = None,
    device: torch.device | None = None,
) -> PrepareResult:
    """Prepare every split of `jobs` into `out` (see the module docstring); call on every torchrun rank."""
    out = Path(out)
    with dist.process_group() as distributed:
        return _run(out, spec, jobs, progress, device, distributed)


def _run(
    out: Path,
    spec: PrepareSpec,
    jobs: list[SplitJob],
    progress: ProgressFn | None,
    device: torch.device | None,
    distributed: bool,
) -> PrepareResult:
    device = device or dist.device()
    # Full fp32 matmuls (CLIP under TF32 would add about the fp16 storage rounding again) and no autotuning
    # (a rerun or another rank picks the same kernels): what the official extraction ran
    dist.cuda_defaults(device, tf32=False, autotune=False)
    rank, world = dist.rank(), dist.world_size()
    enc = _Encoders(spec, device)
    vae_sha = enc.vae.weights_sha256 if enc.vae is not None else None
    clip_sha = enc.clip.weights_sha256 if enc.clip is not None else None
    settings = check.settings(spec, vae_sha, clip_sha)
    views = 2 if spec.flip else 1
    side = spec.resolution if spec.space == "pixel" else spec.resolution // 8
    shape = [3 if spec.space == "pixel" else 8, side, side]
    manifest = data.new_manifest(
        kind=spec.kind,
        space=spec.space,
        conditioning=spec.conditioning,
        shape=shape,
        views=views,
        dtype=settings["dtype"],
        items_per_shard=spec.items_per_shard,
        settings=settings,
        num_classes=len(spec.classes) if spec.labels and spec.classes else None,
        classes=spec.classes,
        context_shape=None,
        encoders=enc.ids(),
        preprocessing=CROP_DESCRIPTIONS[spec.crop] + ("; plus the horizontal flip" if spec.flip else ""),
    )
    writer = data.ShardSetWriter(out, manifest)
    for job in jobs:
        if not job.sources:
            raise DataError(f"the {job.name} split has no images")
    n = {job.name: math.ceil(len(job.sources) / spec.items_per_shard) for job in jobs}
    splits = {job.name: (source_digest(job.sources), n[job.name]) for job in jobs}
    writer.check_splits(splits)
    check.require_resources(out, spec, jobs, enc, device)

    dist.barrier()  # every rank has checked --out before rank 0 writes to it
    if rank == 0:
        empty = enc.texts([""])[0] if enc.clip is not None else None  # (77, D) float32: CLIP("")
        writer.begin(splits, empty)
    dist.barrier()

    result = PrepareResult(out, writer.manifest)
    # re-hashing finished shards' sources reads files: threads, as hashlib and reads release the GIL
    with ThreadPoolExecutor(max(1, spec.num_workers or 1)) as pool:
        for job in jobs:
            mine = [k for k in range(n[job.name]) if k % world == rank]
            pending = writer.todo(job.name, mine, check.digests_now(job, spec.items_per_shard, pool))
            result.reused[job.name] = len(mine) - len(pending)
            result.written[job.name] = _prepare_split(
                writer, job, spec, enc, pending, progress, result.reused[job.name]
            )
    dist.barrier()
    if rank == 0:
        for job in jobs:
            writer.finish(job.name, n[job.name])
    dist.barrier()
    if distributed:
        result.manifest = data.read_manifest(out)
    return result
