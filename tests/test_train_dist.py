"""Two CPU processes (torchrun, gloo) train exactly what one process trains with the same global batch."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
from train_fixtures import TORCHRUN_2, tiny_preset, write_pixel_set
from train_fixtures import losses as _losses
from train_fixtures import weights as _weights

from uvit_cli.train import train


def test_two_gloo_processes_match_one_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    shards = write_pixel_set(tmp_path / "px", n=32)
    # 32 items / global batch 8 = 4 batches per epoch: 5 steps cross into epoch 1 (a new permutation).
    preset = tiny_preset(shards, steps=5, save_interval=5)
    one = tmp_path / "one"
    train(preset, one)

    toml = tmp_path / "tiny.toml"
    toml.write_text(preset.to_toml())
    two = tmp_path / "two"
    cmd = [
        *TORCHRUN_2,
        "-m",
        "uvit_cli",
        "train",
        str(toml),
        "--run-dir",
        str(two),
        "--batch-per-gpu",
        "2",  # each rank's share of 4 in two micro-batches: DDP no_sync + accumulation
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x2; global batch 8 = 2 x 2 x 2" in proc.stderr  # rank 0 reports the geometry, once

    a, b = _losses(one), _losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=1e-5, atol=1e-7)
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = _weights(one, 5, name), _weights(two, 5, name)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
    state = torch.load(two / "ckpts" / "00000005" / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["world_size"] == 2  # RNG states of both ranks
    assert state["data"] == {"epoch": 1, "batch": 1, "global_batch": 8}
