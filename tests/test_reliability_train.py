"""Faults of `uvit train`, its run dir, checkpoints and presets: another data set under the same run, a renamed
checkpoint, absurd presets and metrics, a full disk at a save, a start that fails, names used as paths.
Each ends in one line (or one warning), loses nothing, and the rerun repairs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import tiny_preset, write_pixel_set
from typer.testing import CliRunner

from uvit_cli import checkpoint as ck
from uvit_cli import resources
from uvit_cli.cli import app
from uvit_cli.config import SEED_MAX, check_run_name, load_preset, preset_from_dict, preset_from_toml
from uvit_cli.errors import ConfigError
from uvit_cli.train import read_metrics, train
from uvit_cli.train.plot import Series, svg_plot
from uvit_cli.train.report import write_report


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _ok(res) -> str:
    assert res.exit_code == 0 and res.exception is None, res.output
    return res.output


def _error_line(res, code: int = 2) -> str:
    """The one `error:` line of a failed command (a traceback is an uncaught exception: no SystemExit)."""
    assert isinstance(res.exception, SystemExit) and res.exit_code == code, (res.exception, res.output)
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


def _toml(tmp_path: Path, data: Path, name: str = "tiny.toml", **train_kw: object) -> Path:
    path = tmp_path / name
    path.write_text(tiny_preset(data, **{"steps": 3, "save_interval": 3, **train_kw}).to_toml())
    return path


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# The data a run trains on is part of it


def test_resuming_on_another_prepared_set_is_refused_unless_told(shards, tmp_path):
    toml, run = _toml(tmp_path, shards), tmp_path / "run"
    _ok(_run("train", str(toml), "--run-dir", str(run)))
    before = _files(run / "ckpts") | {"preset.toml": (run / "preset.toml").read_bytes()}

    other = write_pixel_set(tmp_path / "other", seed=1)  # same settings and names, other pixels
    longer = ("--set", "train.steps=6")
    res = _run("train", str(toml), "--run-dir", str(run), "--set", f"data.path={other}", *longer)
    line = _error_line(res, 2)
    assert str(shards.resolve()) in line and str(other.resolve()) in line and "--data-changed" in line
    assert _files(run / "ckpts") | {"preset.toml": (run / "preset.toml").read_bytes()} == before
    assert json.loads((run / "data.json").read_text())["path"] == str(shards.resolve())

    # The same set moved elsewhere is the same data: the run resumes without a word about it.
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    out = _ok(_run("train", str(toml), "--run-dir", str(run), "--set", f"data.path={moved}", *longer))
    assert "resuming from 00000003" in out and "warning" not in out, out
    assert json.loads((run / "data.json").read_text())["path"] == str(moved.resolve())

    # Told, it continues on the new set and says so once.
    res = _run("train", str(toml), "--run-dir", str(run), "--set", f"data.path={other}", "--set",
               "train.steps=9", "--data-changed")  # fmt: skip
    out = _ok(res)
    assert "resuming from 00000006" in out and "--data-changed" in out, out
    assert json.loads((run / "data.json").read_text())["path"] == str(other.resolve())


# --------------------------------------------------------------------------------------------------
# A checkpoint's step is the one it records


def test_a_checkpoint_renamed_to_a_higher_step_resumes_at_its_stored_step(shards, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_preset(shards, steps=6, save_interval=3), straight)

    run = tmp_path / "run"
    train(tiny_preset(shards, steps=3, save_interval=3), run)
    os.rename(run / "ckpts" / "00000003", run / "ckpts" / "00000009")
    assert [s for s, _ in ck.list_checkpoints(run)] == [3]

    events: list = []
    result = train(tiny_preset(shards, steps=6, save_interval=3), run, on_event=events.append)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("holds step 3" in m and "00000009" in m for m in warnings), warnings
    assert "resuming from 00000009" in next(e.message for e in events if e.kind == "start")
    assert result.step == 6 and _losses(run) == _losses(straight)
    assert [(s, p.name) for s, p in ck.list_checkpoints(run)] == [(3, "00000009"), (6, "00000006")]
    assert ck.latest_checkpoint(run).name == "00000006"

    # The rerun trusts the stored steps: the run is done, nothing is redone.
    events = []
    again = train(tiny_preset(shards, steps=6, save_interval=3), run, on_event=events.append)
    assert again.step == 6 and "nothing to do" in events[-1].message


# --------------------------------------------------------------------------------------------------
# Presets nested absurdly deep, seeds that overflow, names that are paths


DEEP = "[" * 10000 + "]" * 10000


def test_deeply_nested_toml_is_one_line(shards, tmp_path):
    deep_file = tmp_path / "deep.toml"
    deep_file.write_text(f'name = "deep"\nx = {DEEP}\n')
    for args in (["presets", "show", str(deep_file)], ["train", str(deep_file)]):
        assert "nested too deeply" in _error_line(_run(*args), 2)
    toml = _toml(tmp_path, shards)
    for args in (
        ["train", str(toml), "--set", f"train.x={DEEP}"],
        ["presets", "show", str(toml), "--set", f"x={DEEP}"],
    ):
        line = _error_line(_run(*args), 2)
        assert "nested too deeply" in line and len(line) < 300, line
    # The preset embedded in a checkpoint.
    from safetensors.torch import save_file

    weights = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(1)}, str(weights), metadata={"format": "uvit", "preset": f"x = {DEEP}"})
    with pytest.raises(ConfigError, match="embedded preset.*nested too deeply"):
        ck.load_weights(weights)
    assert "nested too deeply" in _error_line(_run("train", str(toml), "--init", str(weights), "--run-dir",
                                                   str(tmp_path / "ft")), 2)  # fmt: skip
    assert not (tmp_path / "ft" / "preset.toml").exists()


def test_any_text_a_preset_takes_is_written_back_readable(shards, tmp_path):
    """preset.toml and the checkpoints' embedded preset are read back on resume and by `uvit sample`."""
    text = 'cr\r tab\t nul\0 esc\x1b del\x7f quote" backslash\\ \u00e9\u2713'
    preset = tiny_preset(shards).model_copy(update={"description": text})
    assert preset_from_toml(preset.to_toml()).description == text
    line = _error_line(_run("presets", "show", "shapes_uvit_tiny", "--set", "description=\udcff"), 2)
    assert "not UTF-8 text" in line  # bytes that are not UTF-8 on a command line


def test_seeds_are_checked_against_what_torch_and_numpy_accept(shards):
    torch.Generator().manual_seed(SEED_MAX)  # the largest seed a preset takes works in both
    np.random.default_rng(np.random.SeedSequence([SEED_MAX, 1]))
    for key in ("train.seed", "eval.seed"):
        assert load_preset("shapes_uvit_tiny", [f"{key}={SEED_MAX}"])
        for bad in ("99999999999999999999999", str(SEED_MAX + 1), "-1"):
            with pytest.raises(ConfigError, match=f"--set {key}={bad}: {key}"):
                load_preset("shapes_uvit_tiny", [f"{key}={bad}"])


@pytest.mark.parametrize("name", ["../../x", "/abs", "", ".", "..", "a/b", "a\\b", "a\0b", " x", "x\n"])
def test_a_run_name_is_one_path_component(name):
    data = tiny_preset("feats/px").model_dump(mode="json") | {"name": name}
    with pytest.raises(ConfigError, match="^preset: name: "):
        preset_from_dict(data)
    with pytest.raises(ValueError):
        check_run_name(name)


def test_a_name_that_is_a_path_is_refused_before_anything_is_written(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toml = _toml(tmp_path, shards)
    for name in ("../../escaped", str(tmp_path / "abs"), "", "."):
        line = _error_line(_run("train", str(toml), "--set", f"name={name}"), 2)
        assert f"--set name={name}: name: " in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]
    assert check_run_name("coco_uvit_s2-deep.v2") == "coco_uvit_s2-deep.v2"


# --------------------------------------------------------------------------------------------------
# A start that fails leaves nothing that blocks the next


def test_a_model_that_cannot_fit_is_refused_before_it_is_built_and_blocks_no_rerun(
    shards, tmp_path, monkeypatch
):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 16 << 30)
    toml, run = _toml(tmp_path, shards), tmp_path / "run"
    huge = ("--set", "model.embed_dim=65536", "--set", "model.depth=64")
    line = _error_line(_run("train", str(toml), "--run-dir", str(run), *huge), 2)
    assert "TiB of memory" in line and "16.0 GiB is available" in line and "model.embed_dim" in line, line
    line = _error_line(
        _run("train", str(toml), "--run-dir", str(run), "--set", "train.seed=99999999999999999999999")
    )
    assert "train.seed" in line
    assert not (run / "preset.toml").exists()
    assert "new run in" in _ok(_run("train", str(toml), "--run-dir", str(run)))  # no --force needed


def test_a_forced_start_whose_checkpoint_does_not_fit_keeps_the_run_dir_as_it_was(shards, tmp_path):
    toml, run = _toml(tmp_path, shards), tmp_path / "run"
    _ok(_run("train", str(toml), "--run-dir", str(run)))
    before = sorted(p.name for p in run.iterdir()), (run / "preset.toml").read_text()
    res = _run("train", str(toml), "--run-dir", str(run), "--set", "model.embed_dim=64", "--force")
    assert "does not fit the model" in _error_line(res, 2)
    assert (sorted(p.name for p in run.iterdir()), (run / "preset.toml").read_text()) == before
    res = _run("train", str(toml), "--run-dir", str(run), "--set", "train.steps=4")  # the old run, no --force
    assert "resuming from 00000003" in _ok(res)


# --------------------------------------------------------------------------------------------------
# metrics.jsonl lines that are no records


BAD_LINES = ['[1, 2]', '"x"', "3", "null", '{"step": "x"}', '{"loss": 1}', '{"step": -1}', '{"step": true}',
             "[" * 100000 + "]" * 100000]  # fmt: skip
ODD_RECORDS = ['{"step": 1e30, "loss": 1e30}', '{"step": 2, "loss": 1e999, "lr": -1e308}',
               '{"step": 1, "time": 1e30, "img_per_s": 5e-324, "data_wait_ms": 1e308}']  # fmt: skip


def test_metrics_lines_that_are_not_records_are_one_warning_on_resume(shards, tmp_path):
    toml, run = _toml(tmp_path, shards), tmp_path / "run"
    _ok(_run("train", str(toml), "--run-dir", str(run)))
    metrics = run / "metrics.jsonl"
    good = metrics.read_bytes()
    odd = "\n".join(ODD_RECORDS).encode()
    metrics.write_bytes(good + "\n".join(BAD_LINES).encode() + b"\n\xff\xfe not utf-8\n" + odd + b"\n")
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 1e30, 2, 1]  # the readers skip the rest
    write_report(run)

    out = _ok(_run("train", str(toml), "--run-dir", str(run), "--set", "train.steps=5"))
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "10 lines (the first: line 4) not a metrics record" in warnings[0], out
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 2, 1, 4, 5]  # kept: the records up to step 3
    assert (run / "report.html").is_file()


def test_the_report_draws_any_finite_numbers(tmp_path):
    values = [0.0, 5e-324, 1e-300, 1e-100, 1e-13, -7.5, 1e99, 1e100, 1e101, -1e308, 1.7976931348623157e308]
    run = tmp_path / "run"
    run.mkdir()
    for a in values:
        for b in values:
            lines = [{"step": 1, "loss": a, "lr": b, "img_per_s": a, "fid": b, "time": a},
                     {"step": b, "loss": b, "data_wait_ms": a, "time": b}]  # fmt: skip
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            assert "<html" in write_report(run).read_text()
    for log in (True, False):
        for a in values[:8]:
            svg = svg_plot(Series("k", "k", "#000", log=log), [0.0, 1.0, 2.0], [a, a, abs(a) * 3], 2.0)
            assert "nan" not in svg and "inf" not in svg


# --------------------------------------------------------------------------------------------------
# A full disk while a checkpoint is written


def test_torchs_zip_writer_failing_at_a_save_is_the_disk_full_line(shards, tmp_path, monkeypatch):
    toml, run = _toml(tmp_path, shards, save_interval=1), tmp_path / "run"
    _ok(_run("train", str(toml), "--run-dir", str(run), "--max-steps", "1"))
    before = _files(run / "ckpts" / "00000001")
    real = torch.save

    def zip_writer_fails(obj, f, *a, **kw):
        real({"partial": torch.zeros(10)}, f)  # some bytes land in the temporary file, then torch gives up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    line = _error_line(_run("train", str(toml), "--run-dir", str(run)), 1)
    assert "state.pt: the disk is full" in line, line
    assert _files(run / "ckpts" / "00000001") == before
    assert (run / "ckpts" / "latest").read_text().strip() == "00000001"
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    monkeypatch.undo()
    assert "resuming from 00000001" in _ok(_run("train", str(toml), "--run-dir", str(run)))


WRITE_PAST_A_SIZE_LIMIT = textwrap.dedent(
    """
    import resource, signal, sys, torch
    from uvit_cli import checkpoint as ck
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (50000, 50000))
    for write in (lambda p: ck.save_state(p, {"step": 1, "x": torch.zeros(100000)}),
                  lambda p: ck.save_weights(p, {"x": torch.zeros(100000)}, None, 1, "ema")):
        try:
            write(sys.argv[1])
        except OSError as e:
            print(e.errno, e.filename)
    """
)


def test_the_real_writers_failing_mid_file_raise_the_os_error_with_the_path(tmp_path):
    target = tmp_path / "out.bin"
    proc = subprocess.run([sys.executable, "-c", WRITE_PAST_A_SIZE_LIMIT, str(target)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [f"{errno.EFBIG} {target}"] * 2, proc.stdout
    assert list(tmp_path.iterdir()) == []  # no temporary, no truncated file
