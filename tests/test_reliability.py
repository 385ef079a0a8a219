"""Faults a user meets: a second process on a run dir, a divergence and its advice, a full disk, paths that
are files or too long, binary preset files, invalid numbers. Each ends in one line and loses nothing."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import tiny_preset
from typer.testing import CliRunner

from uvit_cli import fileio
from uvit_cli.cli import app
from uvit_cli.train.lock import RunDirLock, RunDirLocked


@pytest.fixture
def toml(shards, tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_preset(shards, steps=2, save_interval=1).to_toml())
    return path


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


# --------------------------------------------------------------------------------------------------
# One process per run dir


def test_the_lock_refuses_a_second_holder_and_is_free_after_release(tmp_path):
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirLocked, match=rf"in use by pid {os.getpid()} on "):
            RunDirLock(tmp_path).acquire()
    assert (tmp_path / "lock").read_text() == ""  # released: empty, so the next holder sees no stale lock
    warnings: list[str] = []
    with RunDirLock(tmp_path, warn=warnings.append):
        pass
    assert warnings == []


def test_a_second_train_on_a_run_dir_is_refused_and_a_killed_holder_is_taken_over(toml, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from pathlib import Path
                from uvit_cli.train.lock import RunDirLock
                lock = RunDirLock(Path({str(run)!r}))
                lock.acquire()
                print("locked", flush=True)
                time.sleep(120)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = _run("train", str(toml), "--run-dir", str(run))
        assert res.exit_code == 2
        assert f"is in use by pid {holder.pid} on " in _error_line(res)
        assert not (run / "metrics.jsonl").exists() and not (run / "ckpts").exists()  # touched nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the lock file keeps the dead holder's name
        holder.wait()
    assert json.loads((run / "lock").read_text())["pid"] == holder.pid
    res = _run("train", str(toml), "--run-dir", str(run))
    assert res.exit_code == 0, res.output
    assert f"took over a stale lock of pid {holder.pid}" in res.output
    assert (run / "lock").read_text() == ""


# --------------------------------------------------------------------------------------------------
# Divergence: the printed advice works as printed


def test_the_divergence_advice_works_as_printed(toml, tmp_path):
    run = tmp_path / "run"
    sane = ["--set", "train.warmup_steps=0", "--set", "train.steps=6", "--set", "train.save_interval=10"]
    assert _run("train", str(toml), "--run-dir", str(run), *sane, "--max-steps", "2").exit_code == 0
    res = _run("train", str(toml), "--run-dir", str(run), *sane, "--set", "train.lr=1e30")
    assert res.exit_code == 3
    line = _error_line(res)
    assert "the last good checkpoint is" in line and line.rstrip().endswith("to resume from that checkpoint")
    advice = re.findall(r"--set (train\.(?:lr|grad_clip)=[^ )]+)", line)
    assert advice == ["train.lr=5e+29", "train.grad_clip=1.0"], line
    # Each printed remedy is accepted on the same run dir without --force: the rerun resumes.
    for fix in advice:
        res = _run("train", str(toml), "--run-dir", str(run), *sane, "--set", "train.lr=1e30", "--set", fix)
        assert "different preset" not in res.output and "resuming from 00000002" in res.output, res.output
    res = _run("train", str(toml), "--run-dir", str(run), *sane, "--set", "train.lr=1e-3")
    assert res.exit_code == 0 and "resuming from 00000002" in res.output, res.output
    assert "train.lr: 1e+30 -> 0.001 from here on" in res.output
    assert len(list(run.glob("preset.*.toml"))) >= 1  # every earlier preset is kept


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lr=inf", "finite"),
        ("train.lr=nan", "finite"),
        ("model.depth=0", "model.depth"),
        ("model.num_heads=3", "not divisible by num_heads 3"),
        ("model.patch_size=3", "not a multiple of patch_size 3"),
        ("model.embed_dim=0", "model.embed_dim"),
    ],
)
def test_values_that_cannot_train_are_refused_at_validation(toml, tmp_path, override, words):
    res = _run("train", str(toml), "--run-dir", str(tmp_path / "run"), "--set", override)
    assert res.exit_code == 2 and words in _error_line(res)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Operating-system errors are one line with the path


def test_a_run_dir_that_is_a_file_or_lies_under_one_is_one_line(toml, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    res = _run("train", str(toml), "--run-dir", str(f))
    assert res.exit_code == 1 and str(f) in _error_line(res) and "directory is needed" in res.output
    res = _run("train", str(toml), "--run-dir", str(f / "run"))
    assert res.exit_code == 1 and "is a file, not a directory" in _error_line(res)
    assert f.read_text() == "x"


def test_names_too_long_are_one_line(toml, tmp_path):
    res = _run("train", str(toml), "--run-dir", str(tmp_path / ("r" * 300)))
    assert res.exit_code == 1 and "longer than 255 bytes" in _error_line(res)
    deep = "/".join(["d" * 200] * 25)  # > 4096 bytes
    res = _run("train", str(toml), "--run-dir", str(tmp_path / deep))
    assert res.exit_code == 1 and "longer than" in _error_line(res)


def test_binary_preset_files_are_one_line(tmp_path):
    p = tmp_path / "bin.toml"
    p.write_bytes(bytes(range(256)) * 4)
    for args in (["train", str(p)], ["presets", "show", str(p)]):
        res = _run(*args)
        assert res.exit_code == 2 and "not a TOML text file" in _error_line(res), res.output


def test_a_full_disk_at_checkpoint_save_keeps_the_previous_checkpoint(toml, tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    assert _run("train", str(toml), "--run-dir", str(run), "--max-steps", "1").exit_code == 0
    before = {p.name: p.read_bytes() for p in (run / "ckpts" / "00000001").iterdir()}

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    res = _run("train", str(toml), "--run-dir", str(run))
    assert res.exit_code == 1 and "the disk is full" in _error_line(res)
    assert {p.name: p.read_bytes() for p in (run / "ckpts" / "00000001").iterdir()} == before
    assert (run / "ckpts" / "latest").read_text().strip() == "00000001"
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    monkeypatch.undo()
    res = _run("train", str(toml), "--run-dir", str(run))  # space freed: the rerun finishes the run
    assert res.exit_code == 0 and "resuming from 00000001" in res.output, res.output


# --------------------------------------------------------------------------------------------------
# Atomic writes


def _fail_after_partial_write(monkeypatch, module, name):
    real = getattr(module, name)

    def write_then_fail(f, *a, **kw):
        real(f, *a, **kw)  # the bytes land in the temporary file ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk fills

    monkeypatch.setattr(module, name, write_then_fail)


def test_atomic_writers_leave_the_old_file_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    fileio.write_json_atomic(target, {"a": 1})
    _fail_after_partial_write(monkeypatch, json, "dump")
    with pytest.raises(OSError):
        fileio.write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary left


def test_fid_ref_on_a_full_disk_leaves_no_truncated_npz(tmp_path, monkeypatch):
    from uvit_cli.fid.stats import load_ref_stats, save_stats

    _fail_after_partial_write(monkeypatch, np, "savez")
    with pytest.raises(OSError):
        save_stats(tmp_path / "ref.npz", np.zeros(4), np.eye(4), {"mode": "clean"})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    p = save_stats(tmp_path / "ref.npz", np.zeros(4), np.eye(4), {"mode": "clean"})
    mu, sigma = load_ref_stats(p, dim=4)
    assert mu.shape == (4,) and sigma.shape == (4, 4)


def test_the_fid_is_printed_before_a_stamp_that_cannot_be_written(tmp_path, monkeypatch):
    import uvit_cli.fid as fid

    stamp = {
        "mode": "clean",
        "num_images": 10,
        "inception": {"sha256": "ab" * 32},
        "reference": {"sha256": "cd" * 32},
        "samples": {"path": str(tmp_path / "samples"), "kind": "folder"},
    }
    result = fid.FidResult(fid=12.3456, fid_raw=12.3456, num_images=10, stamp=stamp)
    monkeypatch.setattr(fid, "compute_fid", lambda *a, **kw: result)
    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "samples").mkdir()
    res = _run("fid", str(tmp_path / "samples"), str(tmp_path / "ref.npz"), "--json", str(blocker / "s.json"))
    assert res.exit_code == 1
    assert res.output.index("FID 12.3456") < res.output.index("error:")
    assert "cannot write the stamp" in _error_line(res) and "--no-json" in res.output
