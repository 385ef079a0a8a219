"""Damaged or interrupted prepared data: the reader names the bad file in one line, rerunning the same
`uvit prepare` command repairs it, `uvit prepare verify` finds what only a hash can, and an interrupted
prepare resumes. The set is the captioned-shapes one (a real producer: pixels, contexts, empty context)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from uvit_cli import data
from uvit_cli.cli import app
from uvit_cli.errors import DataError
from uvit_cli.shapes.prepare import prepare_shapes

ARGS = dict(n=40, n_val=10, resolution=16, items_per_shard=16)  # train: 3 shards, val: 1
CLI_ARGS = ["--n", "40", "--val", "10", "--resolution", "16"]


def _prepare(out: Path):
    return prepare_shapes(out, **ARGS)


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a prepared set except the manifest's creation details: what a repair must restore."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != data.MANIFEST
    }


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _error_line(res) -> str:
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code not in (0, None) and len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "shapes"
    _prepare(out)
    return out


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    out = tmp_path / "shapes"
    shutil.copytree(pristine, out)
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[-3] ^= 0x10  # inside the data, after the header: the size stays right
    path.write_bytes(bytes(b))


DAMAGE = {
    "truncated x.npy": ("train/shard-00001/x.npy", _truncate),
    "deleted context.npy": ("train/shard-00002/context.npy", lambda p: p.unlink()),
    "deleted empty_context.npy": ("empty_context.npy", lambda p: p.unlink()),
    "deleted shard folder": ("train/shard-00000", shutil.rmtree),
    "truncated context_offsets.npy": ("val/shard-00000/context_offsets.npy", _truncate),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_reader_names_the_damaged_file_and_a_rerun_repairs_it(case, copy, pristine):
    rel, damage = DAMAGE[case]
    damage(copy / rel)
    split = rel.split("/")[0] if "/" in rel else "train"
    with pytest.raises(DataError, match=rel.split("/")[-1].replace(".", r"\.")) as e:
        data.FeatureDataset(copy, split)
    assert "rerun the same uvit prepare command" in str(e.value)

    r = _prepare(copy)  # the same command again: repairs, keeps the rest
    assert sum(r.written.values()) == (0 if rel == "empty_context.npy" else 1)
    assert _files(copy) == _files(pristine)
    data.verify(copy)
    assert len(data.FeatureDataset(copy, split)) == (40 if split == "train" else 10)


def test_uvit_train_refuses_damaged_data_in_one_line(copy, tmp_path):
    _truncate(copy / "train/shard-00001/x.npy")
    res = _run(
        "train", "shapes_uvit_tiny", "--run-dir", str(tmp_path / "run"),
        "--set", f"data.path={copy}", "--set", "train.steps=1",
    )  # fmt: skip
    line = _error_line(res)
    assert "shard-00001/x.npy" in line and "truncated" in line and "rerun" in line


def test_flipped_bytes_are_found_by_verify_and_repaired_by_a_rerun(copy, pristine):
    _flip(copy / "train/shard-00002/x.npy")
    data.FeatureDataset(copy)  # the cheap check cannot see it (same size, valid header)
    res = _run("prepare", "verify", str(copy))
    assert "shard-00002/x.npy" in _error_line(res) and "sha256" in res.output

    r = _prepare(copy)
    assert r.written == {"train": 1, "val": 0} and _files(copy) == _files(pristine)
    res = _run("prepare", "verify", str(copy))
    assert res.exit_code == 0, res.output
    assert "train: " in res.output and "val: " in res.output and "intact" in res.output


def test_verify_of_a_folder_without_a_set_is_one_line(tmp_path):
    assert "prepare the data first" in _error_line(_run("prepare", "verify", str(tmp_path)))


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: [],
        lambda m: {**m, "splits": []},
        lambda m: {**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "items": 41}}},
        lambda m: {**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "shards": [{}]}}},
        lambda m: {**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "shards": None}}},
    ],
    ids=["list", "splits-list", "wrong-count", "empty-shard-entry", "no-shards"],
)
def test_an_edited_manifest_is_one_line_and_a_rerun_rebuilds_it(edit, copy, pristine, tmp_path):
    path = copy / data.MANIFEST
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(DataError, match="manifest|damaged"):
        data.FeatureDataset(copy)
    res = _run(
        "train", "shapes_uvit_tiny", "--run-dir", str(tmp_path / "run"),
        "--set", f"data.path={copy}", "--set", "train.steps=1",
    )  # fmt: skip
    assert "manifest" in _error_line(res)

    r = _prepare(copy)
    assert sum(r.written.values()) == 0  # the shards were fine: kept, the manifest rebuilt from them
    assert _files(copy) == _files(pristine)
    assert data.read_manifest(copy)["splits"] == data.read_manifest(pristine)["splits"]
    assert len(data.FeatureDataset(copy)) == 40


def test_interrupted_prepare_shapes_resumes_and_leaves_no_temporaries(tmp_path, monkeypatch):
    out = tmp_path / "shapes"
    real = data.write_shard

    def die_in_the_val_shard(split_dir, index, shard, fp):
        if split_dir.name == "val":
            tmp = split_dir / f".tmp-{data.shard_name(index)}-999"  # what a kill -9 leaves behind
            tmp.mkdir()
            (tmp / "x.npy").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(split_dir, index, shard, fp)

    monkeypatch.setattr(data.writer, "write_shard", die_in_the_val_shard)
    res = _run("prepare", "shapes", "--out", str(out), *CLI_ARGS)
    assert (
        res.exit_code == 130 and data.list_shards(out / "train") == [0] and not data.list_shards(out / "val")
    )
    assert not data.read_manifest(out)["splits"]["val"]["complete"]
    with pytest.raises(DataError, match="incomplete"):
        data.FeatureDataset(out, "val")
    monkeypatch.setattr(data.writer, "write_shard", real)

    res = _run("prepare", "shapes", "--out", str(out), *CLI_ARGS)  # the same command: resumes
    assert res.exit_code == 0, res.output
    assert "1 finished shards verified and kept" in res.output
    assert not list(out.rglob(".tmp-*"))

    fresh = tmp_path / "uninterrupted"
    assert _run("prepare", "shapes", "--out", str(fresh), "--name", "uninterrupted", *CLI_ARGS).exit_code == 0
    assert _files(out) == _files(fresh)
    assert data.read_manifest(out)["splits"] == data.read_manifest(fresh)["splits"]


def test_a_rerun_into_a_folder_holding_foreign_files_is_refused(tmp_path):
    out = tmp_path / "shapes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no manifest.json"):
        _prepare(out)


def test_prepare_resolution_is_checked_before_anything_is_written(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        Image.new("RGB", (16, 16), (k * 90, 40, 200)).save(images / f"{k}.png")
    for value in ("0", "-8", "100"):
        out = tmp_path / f"r{value}"
        res = _run(
            "prepare", "folder", str(images), "--out", str(out), "--space", "latent", "--resolution", value,
        )  # fmt: skip
        line = _error_line(res)
        assert f"--resolution {value}" in line and not out.exists(), line
