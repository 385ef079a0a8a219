"""`.ci/gpu-check --dry-run`: the device check on this CPU at tiny sizes, held to the GPU machine's limits.

The device tool brings back at most 8 files from $OUT, two folders deep, and a call ends at 600 s: the check
must leave few files, keep every row's numbers when a later row is killed, and close with a summary that names
every row. The full dry run takes about 2 minutes on 2 cores (slow); the killed-row run about 10 s.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu-check"
MAX_FILES = 8


def _dry_run(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def _script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while being made
    loader.exec_module(module)
    return module


def _check_out(out: Path) -> tuple[dict, list[str]]:
    """results.json and the log's summary lines, after checking what the device tool would bring back."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    results = json.loads((out / "results.json").read_text())
    log = (out / "gpu-check.log").read_text().splitlines()
    start = max(i for i, line in enumerate(log) if line.startswith("== summary"))
    summary = log[start + 2 :]
    assert [line.split()[0] for line in summary] == [r["name"] for r in results["rows"]]  # every row, last
    assert results["done"]
    return results, summary


@pytest.mark.slow
def test_dry_run_passes_within_the_device_limits(tmp_path):
    out = tmp_path / "out"
    r = _dry_run(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results, summary = _check_out(out)
    rows = {row["name"]: row for row in results["rows"]}
    assert {n: row["status"] for n, row in rows.items() if row["status"] != "ok"} == {}
    log = (out / "gpu-check.log").read_text()
    assert "copy host→device 32 MiB (pinned): skipped: no CUDA" in log  # a CUDA-only probe says so
    for name in ("train_s2deep", "train_h2", "sample", "prepare"):
        (report,) = rows[name]["reports"]
        assert [m["recipe"] for m in report["measurements"]][:2] == ["official", "uvit"], name
        assert all(m["warmup_s"] is not None for m in report["measurements"])
        assert " img/s (warm-up " in rows[name]["numbers"]
    assert "forward flash, backward flash" in rows["sdpa_h2"]["numbers"]
    assert "use_checkpoint=false" in " ".join(rows["train_h2"]["command"])
    assert "--no-decode" in rows["sample_nodecode"]["command"]
    # the lever rows: ours, then each rung that applies here; on the CPU only the channels_last decoder does
    (train,) = rows["levers_train"]["reports"]
    assert [m["recipe"] for m in train["measurements"]] == ["uvit"]
    assert set(train["settings"]["skipped"]) == {
        "+FP8 linears",
        "+bf16 stream",
        "+cuDNN attention",
        "+max-autotune",
    }
    assert "skipped: +FP8 linears" in rows["levers_train"]["numbers"]
    (sample,) = rows["levers_sample"]["reports"]
    assert [m["recipe"] for m in sample["measurements"]] == ["uvit", "+channels_last VAE"]
    assert (
        "+channels_last VAE " in rows["levers_sample"]["numbers"]
        and "x uvit" in rows["levers_sample"]["numbers"]
    )
    assert r.stdout.rstrip().endswith(summary[-1])  # the summary is the last thing printed


def test_a_row_killed_by_its_limit_keeps_the_rows_before(tmp_path):
    out = tmp_path / "out"
    r = _dry_run(out, "--only", "device,sample", "--limit", "sample=2")
    assert r.returncode == 1
    results, summary = _check_out(out)
    rows = {row["name"]: row for row in results["rows"]}
    assert rows["device"]["status"] == "ok" and "TFLOP/s" in rows["device"]["numbers"]
    assert rows["device"]["reports"][0]["measurements"]
    assert rows["sample"]["status"] == "timed out" and rows["sample"]["rc"] == 124
    assert rows["train_s2deep"]["status"] == "skipped"
    assert any(line.split()[0] == "sample" and "timed out" in line for line in summary)


def test_versions_are_checked_against_pyproject_and_one_level_down():
    gpu_check = _script()
    problems, seen = gpu_check.check_versions(gpu_check.pyproject_needs())
    assert problems == [] and any(s.startswith("typing-extensions ") for s in seen)  # pydantic's need
    problems, _ = gpu_check.check_versions(["typing-extensions>=99", "surely-not-a-package-uvit>=1"])
    assert (
        problems[0].startswith("typing-extensions ")
        and "pyproject.toml needs typing-extensions>=99" in problems[0]
    )
    assert (
        problems[1]
        == "surely-not-a-package-uvit is not installed (pyproject.toml needs surely-not-a-package-uvit>=1)"
    )


def test_a_version_mismatch_fails_fast_in_one_line(tmp_path, monkeypatch, capsys):
    gpu_check = _script()
    monkeypatch.setattr(gpu_check, "pyproject_needs", lambda: ["typer>=99"])
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "typer" in errors[0] and ">=99" in errors[0]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["status"] == "failed" and {r["status"] for r in rows[1:]} == {"skipped"}
