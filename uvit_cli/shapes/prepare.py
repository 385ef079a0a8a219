"""`uvit prepare shapes`: render the captioned-shapes set and write it as pixel shards with toy-CLIP contexts.

The layout is the one every prepared set has (`uvit_cli.data`): uint8 (n, 1, 3, R, R) pixels, the features
of both captions of each item, and the empty caption's features as the CFG null condition, so
`uvit train presets/shapes_uvit_tiny.toml` reads it with `FeatureDataset` like COCO.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from uvit_cli import data
from uvit_cli.errors import DataError
from uvit_cli.fileio import save_npy_atomic, write_json_atomic
from uvit_cli.prepare.run import PrepareResult, Progress, ProgressFn
from uvit_cli.shapes import render, text

DEFAULT_IMAGES = 10000


def prepare_shapes(
    out: str | os.PathLike[str],
    *,
    n: int = DEFAULT_IMAGES,
    n_val: int | None = None,
    seed: int = 0,
    resolution: int = 32,
    encoder_seed: int = text.SEED,
    items_per_shard: int = 5000,
    dtype: str = "float16",
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """Write `n` training and `n_val` (default n // 10) held-out scenes to `out`; rerunning reuses a finished set."""
    import torch

    out = Path(out)
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
    manifest["context_dtype"] = dtype
    splits = {"train": n, "val": n_val} if n_val else {"train": n}
    if (out / data.MANIFEST).exists():
        old = data.read_manifest(out)
        if old.get("fingerprint") != manifest["fingerprint"]:
            raise DataError(f"{out} holds a set made with other settings; use another --out or delete it")
        if all(old["splits"].get(s, {}).get("complete") for s in splits):
            for s, count in splits.items():
                if progress:
                    progress(Progress(s, count, count, shards_reused=len(old["splits"][s]["shards"])))
            return PrepareResult(out, old, reused={s: len(old["splits"][s]["shards"]) for s in splits})
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty and holds no {data.MANIFEST}; choose an empty or new --out")

    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        empty = encoder.encode([""])[0].numpy()  # (L, D) float32: the CFG null condition
    save_npy_atomic(out / data.EMPTY_CONTEXT, empty)
    result = PrepareResult(out, manifest)
    cache: dict[str, np.ndarray] = {}  # a few hundred distinct captions: encode each once
    for split, count in splits.items():
        split_dir = out / split
        split_dir.mkdir(exist_ok=True)
        data.remove_temporaries(split_dir)
        scenes = render.sample_scenes(count, seed, split)
        state = Progress(split, 0, count)
        metas = []
        for k, lo in enumerate(range(0, count, items_per_shard)):
            part = scenes[lo : lo + items_per_shard]
            captions = [s.captions() for s in part]
            new = sorted({c for cs in captions for c in cs} - cache.keys())
            if new:
                with torch.no_grad():
                    feats = encoder.encode(new).numpy()  # (m, L, D)
                cache.update(zip(new, feats, strict=True))
            shard = data.ShardData(
                x=render.render_many(part, resolution)[:, None],  # (n, 1, 3, R, R) uint8
                keys=[f"{split}-{lo + i:07d}" for i in range(len(part))],
                sources=len(part),
                contexts=[data.to_storage(np.stack([cache[c] for c in cs]), dtype) for cs in captions],
                captions=captions,
            )
            metas.append(data.write_shard(split_dir, k, shard, manifest["fingerprint"]))
            state.done += len(part)
            state.shards_written += 1
            if progress:
                progress(state)
        manifest["splits"][split] = data.split_summary(metas, source_digest=manifest["fingerprint"])
        result.written[split] = len(metas)
    write_json_atomic(out / data.MANIFEST, manifest)
    return result
