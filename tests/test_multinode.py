"""Two torchrun "nodes" of one CPU process each (c10d rendezvous on 127.0.0.1, gloo) train the same model as one
process with the same global batch: the multi-node launch of docs/multinode.md, on one machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import assert_same_as_one_process, one_process_reference

DEADLINE_S = 300  # both nodes together; the test takes ~8 s on the 2-core development machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(node_rank: int, port: int, run_id: str, args: list[str], log: Path) -> subprocess.Popen:
    """One "node": `torchrun --nnodes 2 --nproc-per-node 1` joining the c10d rendezvous at 127.0.0.1:port,
    in its own session so that a failure can kill it with its worker."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",
        str(node_rank),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        run_id,
        "-m",
        "uvit_cli",
        "train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def test_two_nodes_match_one_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    one, toml = one_process_reference(tmp_path)
    # One run dir at the same path for both nodes, as on a shared file system: global rank 0 writes it,
    # and every rank reads the checkpoint it resumes from there.
    two = tmp_path / "two"
    args = [str(toml), "--run-dir", str(two), "--batch-per-gpu", "2"]  # share 4 in two micro-batches
    port, run_id = _free_port(), f"uvit-test-{os.getpid()}"
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    nodes = [_node(r, port, run_id, args, logs[r]) for r in (0, 1)]
    try:
        end = time.monotonic() + DEADLINE_S
        codes = [p.wait(timeout=max(1.0, end - time.monotonic())) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n\n".join(f"node {r}:\n{t[-3000:]}" for r, t in enumerate(text))
    # Global rank 0 reports the geometry, once: c10d numbers the nodes itself (--node-rank is ignored).
    assert sum("x2; global batch 8 = 2 x 2 x 2" in t for t in text) == 1, text

    assert_same_as_one_process(one, two)
    assert _files(two) == _files(one)  # the second node adds nothing to the run dir


def test_ranks_that_see_other_data_or_another_newest_checkpoint_are_refused(monkeypatch, tmp_path):
    """A node with its own (empty) run dir or another copy of the data would resume at another step or train
    other data: the start gathers what every rank sees and names the first rank that differs."""
    from uvit_cli import dist
    from uvit_cli.errors import CheckpointError, DataError
    from uvit_cli.train import loop

    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, obj])
    loop._check_ranks_agree("a" * 64, 30, tmp_path)  # every rank agrees: nothing raised
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, ("b" * 64, obj[1])])
    with pytest.raises(DataError, match="rank 1 reads another prepared set"):
        loop._check_ranks_agree("a" * 64, 30, tmp_path)
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [obj, (obj[0], None)])
    with pytest.raises(CheckpointError, match="rank 1 sees newest checkpoint None, rank 0 sees 30"):
        loop._check_ranks_agree("a" * 64, 30, tmp_path)
