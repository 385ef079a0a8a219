"""[log]: TensorBoard event files and W&B offline runs, read back. Every metrics.jsonl record at its step, each
step once after a killed run resumes, the same W&B run id across the resume, sample grids and the preset,
training bitwise the same with logging on, a missing extra or a failing tracker in one line."""

from __future__ import annotations

import errno
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import tiny_preset, weights

from uvit_cli.config import preset_from_dict
from uvit_cli.errors import ConfigError
from uvit_cli.fileio import sha256_file
from uvit_cli.train import read_metrics, train
from uvit_cli.train.rundir import MetricsLog, check_run_dir, record_run_dir
from uvit_cli.train.tracking import (
    NEEDS_TENSORBOARD,
    NEEDS_WANDB,
    TENSORBOARD_DIR,
    WANDB_ID_FILE,
    TensorBoardSink,
    Trackers,
    check_trackers,
    wandb_mode,
)

pytest.importorskip("tensorboard")

# steps 1..6, a checkpoint at 3 and 6, a grid at 2, 4, 6; the killed run dies after logging step 5
KILL_AT = 5


def _preset(shards: Path, *, tensorboard: bool = True, wandb: bool = False, **train_):
    p = tiny_preset(shards, steps=6, save_interval=3, sample_interval=2, **train_).model_dump(mode="json")
    p["log"] = {"tensorboard": tensorboard, "wandb": wandb, "wandb_project": "uvit-tests"}
    return preset_from_dict(p)


class _Killed(Exception):
    pass


def _kill_after_logging(step: int):
    def on_event(e):
        if e.kind == "log" and e.step == step:
            raise _Killed  # the loop's way out on any error: the trackers close, the lock is released

    return on_event


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, silent, every file of its own under tmp_path: nothing reaches the network."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


# --------------------------------------------------------------------------------------------------
# Reading the files back, independently of uvit_cli.train.tracking


def _tb_events(run: Path) -> list:
    """Every event of every file in RUN/tensorboard, as written (duplicates included), in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    return [e for f in files for e in EventFileLoader(str(f)).Load()]


def _tb_steps(run: Path) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    for e in _tb_events(run):
        for v in e.summary.value:
            steps.setdefault(v.tag, []).append(e.step)
    return steps


def _tb_view(run: Path):
    """What TensorBoard shows: its EventAccumulator over the whole directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def _wandb_records(path: Path):
    """The records of a W&B `.wandb` file: a LevelDB-style log (a 7-byte header ':W&B', 0xBEE1, version;
    32 KiB blocks of chunks: crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) of
    `wandb_internal_pb2.Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # block trailer
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def _wandb_history(run: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(the run id of each offline run folder, in order; every history row of them all: (step, {key: value}))."""
    ids, rows = [], []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        for r in _wandb_records(log):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.append(r.run.run_id)
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                rows.append((r.history.step.num, row))
    return ids, rows


# --------------------------------------------------------------------------------------------------


def test_tensorboard_and_wandb_after_a_killed_run_resumes_hold_each_step_once(
    shards, tmp_path, offline_wandb
):
    """Killed after logging step 5 (past its checkpoint at 3), resumed: the event files hold each step of
    each tag once (TensorBoard drops what lies past the checkpoint, as metrics.jsonl does) with
    metrics.jsonl's values; the W&B run resumes under the same id and never takes a step twice."""
    preset, run = _preset(shards, wandb=True), tmp_path / "run"
    with pytest.raises(_Killed):
        train(preset, run, on_event=_kill_after_logging(KILL_AT))
    killed = _tb_steps(run)
    assert killed["train/loss"] == [1, 2, 3, 4, 5] and killed["samples"] == [2, 4]  # flushed at the exit
    run_id = (run / WANDB_ID_FILE).read_text().strip()

    train(preset, run)
    records = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6]

    # TensorBoard, every event as written, then as TensorBoard shows it
    steps = _tb_steps(run)
    for key in ("loss", "lr", "img_per_s", "data_wait_ms", "epoch"):
        assert steps[f"train/{key}"] == [1, 2, 3, 4, 5, 6], key
    assert "train/time" not in steps and "train/step" not in steps
    assert steps["samples"] == [2, 4, 6]
    assert steps["preset/text_summary"] == [0, 3]  # the preset at each start
    view = _tb_view(run)
    for key in ("loss", "lr", "img_per_s", "data_wait_ms"):
        shown = [(s.step, s.value) for s in view.Scalars(f"train/{key}")]
        assert shown == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in records], key
    image = view.Images("samples")[-1]
    assert image.step == 6 and (image.width, image.height) == (4 * 8 + 5 * 2, 4 * 8 + 5 * 2)
    text = view.Tensors("preset/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'name = "tiny"' in text and "tensorboard = true" in text

    # W&B: two offline folders of the one run id; each step once across them, with metrics.jsonl's numbers
    ids, rows = _wandb_history(run)
    assert ids == [run_id, run_id]
    assert Counter(s for s, _ in rows) == Counter(range(1, 7))  # W&B merges one step's logs into one row
    by_step = dict(rows)
    for m in records:
        assert by_step[m["step"]]["train/loss"] == pytest.approx(m["loss"], rel=1e-12)
        assert by_step[m["step"]]["_step"] == m["step"]
    grids = {s: row for s, row in rows if row.get("samples/_type") == "image-file"}
    assert sorted(grids) == [2, 4, 6]
    for s, row in grids.items():  # the PNG of RUN/samples, as written
        assert row["samples/sha256"] == sha256_file(run / "samples" / f"{s:08d}.png"), s


def test_training_is_bitwise_the_same_with_logging_on(shards, tmp_path, offline_wandb):
    """Both trackers on against both off: the same weights, optimiser state and RNG states at the end."""
    on, off = tmp_path / "on", tmp_path / "off"
    train(_preset(shards, wandb=True), on)
    train(_preset(shards, tensorboard=False), off)
    assert (
        (on / TENSORBOARD_DIR).is_dir() and (on / "wandb").is_dir() and not (off / TENSORBOARD_DIR).exists()
    )
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(on, 6, name), weights(off, 6, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    sa, sb = (torch.load(r / "ckpts" / "00000006" / "state.pt", weights_only=True) for r in (on, off))
    (ra,), (rb,) = sa["rng"], sb["rng"]
    assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]
    assert torch.equal(ra["numpy"]["key"], rb["numpy"]["key"]) and ra["numpy"]["pos"] == rb["numpy"]["pos"]
    for pid, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], sb["optimizer"]["state"][pid]["exp_avg_sq"])


def test_a_failing_tracker_is_one_warning_and_training_goes_on(shards, tmp_path, monkeypatch):
    real = TensorBoardSink.scalars

    def disk_full(self, step, values):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, step, values)

    monkeypatch.setattr(TensorBoardSink, "scalars", disk_full)
    events = []
    result = train(_preset(shards), tmp_path / "run", on_event=events.append)
    assert result.step == 6 and [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    warnings = [e.message for e in events if e.kind == "warning"]
    assert len([w for w in warnings if "TensorBoard" in w]) == 1
    assert (
        "TensorBoard logging stopped at step 2 (OSError" in warnings[0] and "training goes on" in warnings[0]
    )
    assert _tb_steps(tmp_path / "run")["train/loss"] == [1]  # nothing after the failure


def test_eval_rows_go_to_the_trackers_as_eval_metrics(tmp_path):
    """A FID row of metrics.jsonl (as the [eval] observer writes it): each number under eval/<key>."""
    log = MetricsLog(tmp_path, 0)
    sink = TensorBoardSink(tmp_path, 0, 'name = "x"\n')
    trackers = Trackers([sink], warn=pytest.fail)
    log.listeners.append(trackers.record)
    row = {"step": 4, "fid": 12.5, "fid_n": 6, "fid_seconds": 1.0, "fid_best": 12.5, "fid_is_best": True,
           "sfid": 3.25, "inception_score": 1.5, "precision": 0.5, "recall": 0.25}  # fmt: skip
    log.write(row)
    trackers.close()
    view = _tb_view(tmp_path)
    for key in ("fid", "fid_n", "fid_seconds", "fid_best", "sfid", "inception_score", "precision", "recall"):
        assert [(s.step, s.value) for s in view.Scalars(f"eval/{key}")] == [(4, row[key])], key
    assert "eval/fid_is_best" not in view.Tags()["scalars"]


def test_changing_log_on_resume_needs_no_force(shards, tmp_path):
    old, new = _preset(shards, tensorboard=False), _preset(shards, wandb=True)
    record_run_dir(tmp_path, old, check_run_dir(tmp_path, old, force=False), {"identity": "x"})
    assert check_run_dir(tmp_path, new, force=False).notes == []


def test_a_missing_extra_is_one_line_naming_it(shards, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(ConfigError) as e:
        train(_preset(shards), tmp_path / "run")
    assert (
        str(e.value)
        == NEEDS_TENSORBOARD
        == '[log] tensorboard = true needs TensorBoard: pip install "uvit[tensorboard]"'
    )
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(ConfigError, match=r'needs Weights & Biases: pip install "uvit\[wandb\]"') as e:
        check_trackers(_preset(shards, tensorboard=False, wandb=True).log)
    assert str(e.value) == NEEDS_WANDB


def test_wandb_is_offline_without_an_api_key(tmp_path):
    netrc = tmp_path / "netrc"
    assert wandb_mode({"NETRC": str(netrc)}) == "offline"  # no file
    assert wandb_mode({"NETRC": str(netrc), "WANDB_MODE": "disabled"}) is None  # W&B reads $WANDB_MODE
    assert wandb_mode({"NETRC": str(netrc), "WANDB_API_KEY": "k" * 40}) == "online"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_mode({"NETRC": str(netrc)}) == "online"
    assert wandb_mode({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"


def test_the_cli_flags_are_the_log_settings(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import uvit_cli.train
    from uvit_cli.cli import app

    seen = []
    monkeypatch.setattr(uvit_cli.train, "train", lambda p, *a, **k: seen.append(p.log) or _done(tmp_path))
    (tmp_path / "feats").mkdir()
    (tmp_path / "feats" / "manifest.json").write_text("{}")  # past the CLI's prepared-data check
    args = ["train", "shapes_uvit_tiny", "--set", f"data.path={tmp_path / 'feats'}"]
    for flags in ([], ["--tensorboard"], ["--wandb", "--tensorboard"]):
        r = CliRunner().invoke(app, [*args, *flags])
        assert r.exit_code == 0, r.output
    assert [(log.tensorboard, log.wandb) for log in seen] == [(False, False), (True, False), (True, True)]


def _done(run: Path):
    from uvit_cli.train import TrainResult

    return TrainResult(run, 0, None, None)


def test_tensorboard_truncation_keeps_a_file_cut_short_readable(tmp_path):
    """An event file cut mid-record by a kill: the records before the cut are kept, the tail dropped."""
    sink = TensorBoardSink(tmp_path, 0, "")
    for step in (1, 2, 3):
        sink.scalars(step, {"train/loss": float(step)})
    sink.close(failed=False)
    (path,) = (tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*")
    path.write_bytes(path.read_bytes()[:-7])  # the last record (step 3) cut short
    TensorBoardSink(tmp_path, 2, "").close(failed=False)
    assert _tb_steps(tmp_path)["train/loss"] == [1, 2]
    assert np.isclose([s.value for s in _tb_view(tmp_path).Scalars("train/loss")], [1.0, 2.0]).all()
