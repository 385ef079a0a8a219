"""`uvit prepare shapes`: render the captioned-shapes set and write it as pixel shards with toy-CLIP contexts.

The layout is the one every prepared set has (`uvit_cli.data`): uint8 (n, 1, 3, R, R) pixels, the features
of both captions of each item, and the empty caption's features as the CFG null condition, so
`uvit train presets/shapes_uvit_tiny.toml` reads it with `FeatureDataset` like COCO.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uvit_cli import data, resources
from uvit_cli.config import set_dir
from uvit_cli.errors import DataError
from uvit_cli.prepare.result import PrepareResult, Progress, ProgressFn
from uvit_cli.shapes import render, text

if TYPE_CHECKING:
    from uvit_cli.encoders.clip import CLIPTextEncoder

DEFAULT_IMAGES = 10000


def prepare_shapes(
    out: str | os.PathLike[str],
    *,
    name: str = "shapes",
    n: int = DEFAULT_IMAGES,
    n_val: int | None = None,
    seed: int = 0,
    resolution: int | None = None,
    encoder_seed: int = text.SEED,
    items_per_shard: int = 5000,
    dtype: str = "float16",
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """Write `n` training and `n_val` (default n // 10) held-out scenes to `out/<name>` (`config.set_dir`), of
    `resolution` pixels (default: the quickstart preset's, so its `uvit train shapes_uvit_tiny` reads them).
    Rerunning the same call resumes an interrupted one and re-makes damaged shards; a finished set is verified
    and kept."""
    import torch

    if resolution is None:
        from uvit_cli.config import load_preset

        resolution = load_preset("shapes_uvit_tiny").data.resolution

    out = set_dir(out, name)
    n_val = max(n // 10, 1) if n_val is None else n_val
    if n < 1 or n_val < 0:
        raise DataError(f"--n {n}: need at least one training image")
    if resolution < 8:
        raise DataError(f"--resolution {resolution}: at least 8 pixels")
    encoder = text.toy_text_encoder(encoder_seed)
    settings = {
        "format_version": data.FORMAT_VERSION,
        "kind": "shapes",
        "space": "pixel",
        "resolution": resolution,
        "seed": seed,
        "images": {"train": n, "val": n_val},
        "conditioning": "text",
        "dtype": dtype,
        "items_per_shard": items_per_shard,
        "clip_sha256": encoder.weights_sha256,
        "vocabulary": list(text.VOCABULARY),
    }
    manifest = data.new_manifest(
        kind="shapes",
        space="pixel",
        conditioning="text",
        shape=[3, resolution, resolution],
        views=1,
        dtype="uint8",
        items_per_shard=items_per_shard,
        settings=settings,
        context_shape=[text.CONTEXT_LENGTH, text.WIDTH],
        encoders={
            "text": {
                "path": encoder.weights_path,
                "sha256": encoder.weights_sha256,
                "kind": "toy",
                "seed": encoder_seed,
            }
        },
        preprocessing="procedural: Pillow drawing at 4x, box-filter downsampling (uvit_cli.shapes.render)",
    )
    counts = {"train": n, "val": n_val} if n_val else {"train": n}
    n_shards = {s: -(-c // items_per_shard) for s, c in counts.items()}
    writer = data.ShardSetWriter(out, manifest)
    splits = {s: (manifest["fingerprint"], k) for s, k in n_shards.items()}
    writer.check_splits(splits)
    _require_resources(out, resolution, items_per_shard, counts, dtype)
    with torch.no_grad():
        empty = encoder.encode([""])[0].numpy()  # (L, D) float32: the CFG null condition
    writer.begin(splits, empty)

    result = PrepareResult(out, writer.manifest)
    for split, count in counts.items():
        todo = writer.todo(split, n_shards[split])
        state = Progress(split, 0, count, shards_reused=n_shards[split] - len(todo))
        if todo:
            features = _encode_all(encoder, _distinct_captions(count, seed, split, items_per_shard))
        for k in todo:
            lo = k * items_per_shard
            part = render.sample_scenes(min(items_per_shard, count - lo), seed, split, start=lo)
            captions = [s.captions() for s in part]
            shard = data.ShardData(
                x=render.render_many(part, resolution)[:, None],  # (n, 1, 3, R, R) uint8
                keys=[f"{split}-{k * items_per_shard + i:07d}" for i in range(len(part))],
                sources=len(part),
                contexts=[data.to_storage(np.stack([features[c] for c in cs]), dtype) for cs in captions],
                captions=captions,
            )
            writer.write(split, k, shard)
            state.done += len(part)
            state.shards_written += 1
            if progress:
                progress(state)
        if progress and not todo:
            progress(Progress(split, count, count, shards_reused=n_shards[split]))
        writer.finish(split, n_shards[split])
        result.written[split], result.reused[split] = len(todo), n_shards[split] - len(todo)
    result.manifest = writer.manifest
    return result


def _distinct_captions(count: int, seed: int, split: str, chunk: int) -> list[str]:
    """The sorted captions of the split's scenes, drawn a chunk at a time (memory does not grow with count)."""
    found: set[str] = set()
    for lo in range(0, count, chunk):
        found.update(
            c for s in render.sample_scenes(min(chunk, count - lo), seed, split, lo) for c in s.captions()
        )
    return sorted(found)


def _require_resources(
    out: Path, resolution: int, items_per_shard: int, counts: dict[str, int], dtype: str
) -> None:
    """Refuse, before anything is written, a set whose peak memory or bytes on disk cannot fit: the peak is
    one shard (pixels, contexts as computed, stored and concatenated) and one supersampled canvas."""
    pixels = 3 * resolution * resolution
    context = 2 * text.CONTEXT_LENGTH * text.WIDTH  # values per item: two captions
    stored = np.dtype(dtype).itemsize
    shard = min(items_per_shard, max(counts.values()))
    resources.require_memory(
        f"prepare shapes at {resolution} px ({shard} images per shard)",
        shard * (pixels + context * (4 + 2 * stored)) + render.render_peak_bytes(resolution),
        fix="use a smaller --resolution",
    )
    todo = 0  # images of the shards not on disk yet
    for split, c in counts.items():
        present = set(data.list_shards(out / split))
        todo += sum(
            min(items_per_shard, c - lo)
            for lo in range(0, c, items_per_shard)
            if lo // items_per_shard not in present
        )
    resources.require_disk(
        out,
        f"{todo} images of {resolution} px with their caption features",
        todo * (pixels + context * stored + 160),  # + offsets, keys and caption text
        fix="free space, choose another --out, or use a smaller --n or --resolution",
    )


def _encode_all(encoder: CLIPTextEncoder, captions: list[str], batch: int = 256) -> dict[str, np.ndarray]:
    """Features of every distinct caption, in fixed batches of the sorted list: a resumed run computes
    exactly what an uninterrupted one did."""
    import torch

    with torch.no_grad():
        parts = [encoder.encode(captions[i : i + batch]).numpy() for i in range(0, len(captions), batch)]
    return dict(zip(captions, np.concatenate(parts), strict=True))
