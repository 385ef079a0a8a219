"""A tiny class-conditional pixel set and a preset that fits it, for the training, loader, reliability and
CUDA-path tests; `shards` (conftest.py) is one such set per test module.

    write_pixel_set(root, n=32, size=8, classes=4) -> root      flat colours per class: the loss falls fast
    tiny_preset(data_path, **train) -> Preset                     U-ViT 8x8, patch 2, D 32, depth 2, 5 labels
    losses(run) -> [(step, loss)]                                 from metrics.jsonl
    weights(run, step, name) -> {key: tensor}                     one safetensors file of a checkpoint
    one_process_reference(tmp) -> (run, toml)                     what the distributed tests must equal
    assert_same_as_one_process(one, two)                          losses, weights and data position of two ranks
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from uvit_cli import data
from uvit_cli.config import preset_from_dict
from uvit_cli.train import read_metrics

# Two CPU processes under torchrun (gloo): append the script or `-m module` and its arguments.
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def write_pixel_set(root: Path, n: int = 32, size: int = 8, classes: int = 4, seed: int = 0) -> Path:
    """Flat-coloured images, one colour per class (+ a little noise): easy to learn, so the loss falls."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    colours = rng.integers(20, 235, size=(classes, 3))
    x = colours[y][:, :, None, None] + rng.integers(-10, 10, size=(n, 3, size, size))
    data.write_arrays(root, x.clip(0, 255).astype(np.uint8), y=y, num_classes=classes, items_per_shard=10)
    return root


def tiny_preset(data_path: Path | str, **train: object):
    t = dict(
        steps=6,
        batch_size=8,
        lr=2e-3,
        betas=[0.9, 0.99],
        warmup_steps=2,
        ema_rate=0.9,
        p_uncond=0.2,
        log_interval=1,
        save_interval=3,
        sample_interval=10**9,
        keep_last=2,
        num_workers=0,
        compile=False,
        mixed_precision="no",
    )
    t.update(train)
    return preset_from_dict(
        {
            "name": "tiny",
            "model": dict(
                img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=5
            ),
            "data": {
                "kind": "shapes",
                "path": str(data_path),
                "space": "pixel",
                "resolution": 8,
                "random_flip": True,
            },
            "train": t,
            "sample": {"solver": "dpm_solver_pp", "steps": 4, "cfg_scale": 1.0},
        }
    )


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run)]


def weights(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "ckpts" / f"{step:08d}" / name))


def tiny_toml(
    name: str, data: dict, *, model: dict | None = None, sample: dict | None = None, **tables: dict
) -> str:
    """A tiny preset file: U-ViT 8x8 (patch 2, D 32, depth 2, 2 heads), 10 steps of batch 4 with p_uncond 0.1,
    the given [data] and [sample], `model` overriding the size, and any further tables (e.g. text_encoder)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f'"{v}"' if isinstance(v, str | Path) else repr(v)

    body = {
        "model": {"img_size": 8, "patch_size": 2, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 2}
        | (model or {}),
        "data": data,
        "train": {"steps": 10, "batch_size": 4, "lr": 1e-4, "p_uncond": 0.1},
        "sample": sample or {},
        **tables,
    }
    lines = [f'name = "{name}"']
    for table, entries in body.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in entries.items()]
    return "\n".join(lines) + "\n"


def one_process_reference(tmp: Path) -> tuple[Path, Path]:
    """The run every distributed test must equal: 5 steps of the tiny preset on 32 images in one process
    (32 items / global batch 8 = 4 batches per epoch: step 5 crosses into epoch 1, a new permutation).
    Returns its run dir and the preset written as TOML for the torchrun commands."""
    from uvit_cli.train import train

    preset = tiny_preset(write_pixel_set(tmp / "px", n=32), steps=5, save_interval=5)
    one = tmp / "one"
    train(preset, one)
    toml = tmp / "tiny.toml"
    toml.write_text(preset.to_toml())
    return one, toml


def assert_same_as_one_process(one: Path, two: Path) -> None:
    """Two ranks (global batch 8 = 2 ranks x 2 micro-batches x 2) trained what one process trained."""
    a, b = losses(one), losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=1e-5, atol=1e-7)
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = weights(one, 5, name), weights(two, 5, name)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
    state = torch.load(two / "ckpts" / "00000005" / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["world_size"] == 2  # RNG states of both ranks
    assert state["data"] == {"epoch": 1, "batch": 1, "global_batch": 8}
