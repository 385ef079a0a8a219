"""Two CPU processes (torchrun, gloo) train exactly what one process trains with the same global batch."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from train_fixtures import TORCHRUN_2, assert_same_as_one_process, one_process_reference


def test_two_gloo_processes_match_one_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    one, toml = one_process_reference(tmp_path)
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

    assert_same_as_one_process(one, two)
