"""`uvit prepare` when its inputs go wrong: sources changed under the same names, captions of the wrong type,
requests that cannot fit, named pipes among the images, a killed parent of decoding workers, a full disk.
Each ends in one line (or a listed skip), writes nothing wrong, and the corrected rerun works."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from uvit_cli import data, resources
from uvit_cli.cli import app
from uvit_cli.prepare.sources import folder_sources

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc, mkfifo, /dev/full")


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _error_line(res) -> str:
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code not in (0, None), res.output
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


def _bmp_folder(root: Path, seed: int, n: int = 4) -> Path:
    """n 8x8 BMP images: every file has the same size whatever its pixels (a header, then 8*8*3 bytes)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{k}.bmp")
    return root


def _folder(images: Path, out: Path, *more: str):
    return _run("prepare", "folder", images, "--out", out, "--name", "set", "--space", "pixel",
                "--resolution", "8", "--crop", "lanczos", "--items-per-shard", "2", "--workers", "0", *more)  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# Stale data: the change check covers the contents


def test_another_folder_with_the_same_names_sizes_and_times_is_refused(tmp_path):
    a = _bmp_folder(tmp_path / "a", seed=0)
    out = tmp_path / "data"
    assert _folder(a, out).exit_code == 0
    before = _files(out / "set")
    b = _bmp_folder(tmp_path / "b", seed=1)  # other pixels under the same names, same sizes
    for p in sorted(a.iterdir()):
        assert p.stat().st_size == (b / p.name).stat().st_size
        st = p.stat()
        os.utime(b / p.name, ns=(st.st_atime_ns, st.st_mtime_ns))
    line = _error_line(_folder(b, out))
    assert "sources changed" in line and str(b / "0.bmp") in line and "another --out" in line, line
    assert _files(out / "set") == before  # nothing mixed, nothing lost
    assert _folder(a, out).exit_code == 0  # the original sources are still accepted


def test_an_image_edited_in_place_with_its_time_restored_is_refused(tmp_path):
    a = _bmp_folder(tmp_path / "a", seed=0)
    out = tmp_path / "data"
    assert _folder(a, out).exit_code == 0
    before = _files(out / "set")
    target = a / "3.bmp"  # in the second shard: every finished shard is checked, not only the first
    st = target.stat()
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF  # one pixel value; the size stays
    target.write_bytes(bytes(raw))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    line = _error_line(_folder(a, out))
    assert "sources changed" in line and str(target) in line, line
    assert _files(out / "set") == before
    fresh = _folder(a, tmp_path / "fresh")  # a new --out takes the edited image
    assert fresh.exit_code == 0, fresh.output


def test_an_edited_official_feature_file_is_refused(tmp_path):
    src = tmp_path / "imagenet256_features"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pair = np.empty(2, dtype=object)
        pair[0], pair[1] = rng.standard_normal((8, 4, 4)).astype(np.float32), np.int64(i)
        np.save(src / f"{i}.npy", pair, allow_pickle=True)
    args = ("prepare", "official-features", src, "--out", tmp_path / "o", "--items-per-shard", "2")
    with (
        pytest.MonkeyPatch.context() as m
    ):  # a shard that cannot be held is refused before anything is written
        m.setattr(resources, "available_memory_bytes", lambda: 1000)
        assert "memory" in _error_line(_run(*args)) and not (tmp_path / "o").exists()
    assert _run(*args).exit_code == 0
    pair = np.load(src / "2.npy", allow_pickle=True)
    pair[0] = pair[0] + 1
    np.save(src / "2.npy", pair, allow_pickle=True)  # same name, same size, other moments
    line = _error_line(_run(*args))
    assert "sources changed" in line and "2.npy" in line, line


# --------------------------------------------------------------------------------------------------
# Captions: a string or a list of strings, validated by one rule


def _captioned(tmp_path: Path, jsonl: bytes) -> Path:
    root = _bmp_folder(tmp_path / "imgs", seed=0, n=2)
    (root / "captions.jsonl").write_bytes(jsonl)
    return root


def test_a_captions_string_is_one_caption_not_one_per_character(tmp_path):
    root = _captioned(
        tmp_path, b'{"file": "0.bmp", "captions": "a red circle"}\n{"file": "1.bmp", "caption": "x"}\n'
    )
    sources, _, has_captions = folder_sources(root)
    assert has_captions and [s.captions for s in sources] == [["a red circle"], ["x"]]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"file": "0.bmp", "caption": null}', "not null"),
        ('{"file": "0.bmp", "caption": 42}', "not 42"),
        ('{"file": "0.bmp", "captions": ["ok", 7]}', "not 7"),
        ('{"file": "0.bmp", "captions": []}', "empty list"),
        ('{"file": "0.bmp", "caption": "   "}', "empty caption"),
        ('{"file": "0.bmp", "caption": {"text": "a"}}', 'not {"text": "a"}'),
        ('{"file": 3, "caption": "a"}', "expected"),
        ('{"file": "0.bmp"}', "expected"),
        ('[1, 2]', "expected"),
        ('{"file": "0.bmp", "caption": "a", "captions": ["b"]}', "both"),
        ('{"file": "0.bmp", "caption": "a"', "not JSON"),
        ("[" * 100000 + "]" * 100000, "not JSON"),
    ],
)  # fmt: skip
def test_captions_of_the_wrong_type_are_one_line_naming_the_file_and_line(tmp_path, line, words):
    root = _captioned(tmp_path, ('{"file": "1.bmp", "caption": "fine"}\n' + line + "\n").encode())
    err = _error_line(_folder(root, tmp_path / "out"))
    assert f"{root / 'captions.jsonl'}:2:" in err and words in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["captions.jsonl", "0.txt"])
def test_caption_files_that_are_not_utf8_are_one_line(tmp_path, where):
    root = _bmp_folder(tmp_path / "imgs", seed=0, n=2)
    body = b'{"file": "0.bmp", "caption": "ok"}\n{"file": "1.bmp", "caption": "caf\xe9"}\n'
    (root / where).write_bytes(body if where.endswith("jsonl") else b"fine\ncaf\xe9\n")
    err = _error_line(_folder(root, tmp_path / "out"))
    assert f"{root / where}:2:" in err and "UTF-8" in err, err


def _coco(root: Path, caption: object, raw: bytes | None = None) -> Path:
    (root / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train2014" / "a.jpg")
    ann = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "fine"},
            {"image_id": 1, "id": 77, "caption": caption},
        ],
    }
    (root / "annotations" / "captions_train2014.json").write_bytes(raw or json.dumps(ann).encode())
    return root


@pytest.mark.parametrize(
    ("caption", "words"), [(None, "not null"), (42, "not 42"), (["a", "b"], 'not ["a", "b"]')]
)
def test_coco_captions_of_the_wrong_type_are_one_line_naming_the_annotation(tmp_path, caption, words):
    coco = _coco(tmp_path / "coco", caption)
    err = _error_line(
        _run("prepare", "coco", "--coco-root", coco, "--out", tmp_path / "o", "--split", "train")
    )
    assert "captions_train2014.json" in err and "annotation 77" in err and words in err, err


@pytest.mark.parametrize("raw", [b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}', b"[" * 100000])
def test_coco_annotations_not_utf8_or_nested_too_deep_are_one_line(tmp_path, raw):
    coco = _coco(tmp_path / "coco", "x", raw=raw)
    err = _error_line(
        _run("prepare", "coco", "--coco-root", coco, "--out", tmp_path / "o", "--split", "train")
    )
    assert "captions_train2014.json" in err, err


def test_a_manifest_nested_too_deeply_is_one_line_and_the_rerun_rebuilds_it(tmp_path):
    args = ("prepare", "shapes", "--out", tmp_path, "--n", "4", "--val", "1", "--resolution", "8")
    assert _run(*args).exit_code == 0
    (tmp_path / "shapes" / data.MANIFEST).write_text("[" * 100000)
    assert "unreadable manifest" in _error_line(_run("prepare", "verify", tmp_path / "shapes"))
    res = _run(*args)
    assert res.exit_code == 0, res.output
    assert _run("prepare", "verify", tmp_path / "shapes").exit_code == 0


# --------------------------------------------------------------------------------------------------
# Requests that cannot fit: refused before allocating, nothing left behind


def test_prepare_shapes_at_20000_px_is_refused_before_allocating(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 24 << 30)
    out = tmp_path / "data"
    err = _error_line(_run("prepare", "shapes", "--out", out, "--n", "4", "--resolution", "20000"))
    assert "memory" in err and "GiB" in err and "--resolution" in err, err
    assert not out.exists()
    res = _run("prepare", "shapes", "--out", out, "--n", "4", "--val", "1", "--resolution", "8")
    assert res.exit_code == 0, res.output  # the corrected rerun is not blocked


def test_prepare_shapes_with_a_billion_images_is_refused_by_the_disk_estimate(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "free_disk_bytes", lambda path: 10 << 30)
    out = tmp_path / "data"
    err = _error_line(_run("prepare", "shapes", "--out", out, "--n", "1000000000", "--resolution", "16"))
    assert "on disk" in err and "10.0 GiB is free" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "more",
    [
        ("--resolution", "4096"),
        ("--items-per-shard", "64"),  # one shard of all 64 images
        ("--workers", "8"),  # 8 workers x 4 batches in flight
    ],
)
def test_prepare_folder_that_cannot_fit_in_memory_is_refused_first(tmp_path, monkeypatch, more):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 16 << 20)
    images = _bmp_folder(tmp_path / "imgs", seed=0, n=64)
    out = tmp_path / "out"
    args = ["prepare", "folder", images, "--out", out, "--name", "set", "--space", "pixel", "--resolution", "256",
            "--crop", "lanczos", "--items-per-shard", "8", "--batch-size", "8", "--workers", "0"]  # fmt: skip
    err = _error_line(_run(*args, *more))
    assert "memory" in err and "16.0 MiB is available" in err, err
    assert not out.exists()
    res = _run(*args)  # the same images in shards of 8: the peak is one shard, whatever the number of images
    assert res.exit_code == 0, res.output
    assert len(data.FeatureDataset(out / "set")) == 64


def test_prepare_folder_that_cannot_fit_on_disk_is_refused_first(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "free_disk_bytes", lambda path: 1000)
    images = _bmp_folder(tmp_path / "imgs", seed=0, n=4)
    err = _error_line(_folder(images, tmp_path / "out"))
    assert "on disk" in err and "1000 B is free" in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Named pipes and other non-regular files: listed and skipped, never opened


class _PipeWatch:
    """Notices (and releases) anyone blocked reading the named pipes: a writer can open a pipe without
    blocking only while a reader has it open. Test code, so it never depends on how long anything takes."""

    def __init__(self, pipes: list[Path]) -> None:
        self.pipes, self.opened, self.stop = pipes, [], threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.05):
            for p in self.pipes:
                try:
                    fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: nobody is reading it
                    continue
                self.opened.append(p.name)
                os.close(fd)  # the reader sees end of file instead of waiting forever

    def __enter__(self) -> _PipeWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@linux
@pytest.mark.parametrize("workers", ["0", "2"])
def test_named_pipes_and_broken_links_among_the_images_are_listed_and_never_opened(tmp_path, workers):
    images = _bmp_folder(tmp_path / "imgs", seed=0, n=3)
    os.mkfifo(images / "1b.png")
    os.symlink(tmp_path / "gone.png", images / "1c.png")
    out = tmp_path / "out"
    with _PipeWatch([images / "1b.png"]) as watch:
        res = _run("prepare", "folder", images, "--out", out, "--name", "set", "--space", "pixel",
                   "--resolution", "8", "--workers", workers)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert watch.opened == []
    skipped = {s["key"]: s["reason"] for s in data.read_manifest(out / "set")["splits"]["train"]["skipped"]}
    assert "named pipe" in skipped["1b.png"] and "broken symbolic link" in skipped["1c.png"], skipped
    assert "3 items" in res.output and "1b.png (a named pipe" in res.output, res.output
    res = _run("prepare", "folder", images, "--out", out, "--name", "set", "--space", "pixel",
               "--resolution", "8", "--workers", workers)  # fmt: skip
    assert res.exit_code == 0, res.output  # the rerun keeps the set (and still opens no pipe)


# --------------------------------------------------------------------------------------------------
# Decoding workers die with their parent


_BLOCKED_WORKERS = textwrap.dedent(
    """
    import sys
    from torch.utils.data import Dataset
    from uvit_cli.workers import worker_loader

    class Blocked(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            with open(sys.argv[1], "rb") as f:  # a named pipe nobody writes: blocks in the read
                return f.read()

    if __name__ == "__main__":
        for _ in worker_loader(Blocked(), num_workers=2, batch_size=1):
            pass
    """
)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (a scan of /proc: no timing assumed)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _poll(condition, what: str, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"still waiting after {deadline_s:.0f} s for {what}")
        time.sleep(0.05)


@linux
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_decoding_workers_die_with_their_killed_parent(tmp_path, sig):
    script = tmp_path / "blocked.py"
    script.write_text(_BLOCKED_WORKERS)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    parent = subprocess.Popen([sys.executable, str(script), str(pipe)], stderr=subprocess.DEVNULL)
    workers: list[int] = []

    def started() -> bool:
        workers[:] = _children(parent.pid)
        return len(workers) >= 2

    try:
        _poll(started, "the two workers to start", deadline_s=300.0)  # importing torch on a busy machine
        parent.send_signal(sig)
        parent.wait()
        _poll(lambda: not any(_alive(w) for w in workers), f"workers {workers} to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# A full disk is named as one


def _disk_with_room_for(room: int) -> type[io.FileIO]:
    """Files on a disk with `room` bytes free, as the kernel writes them: a short write, then ENOSPC."""
    left = [room]

    class FullDisk(io.FileIO):
        def write(self, b) -> int:  # type: ignore[override]
            n = min(len(memoryview(b)), left[0])
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= n
            return super().write(memoryview(b)[:n])

    return FullDisk


def test_a_short_write_is_a_full_disk():
    from uvit_cli.data.format import write_npy

    class Short(io.BytesIO):  # a raw file that takes part of a write and reports it, as write(2) may
        def write(self, b) -> int:  # type: ignore[override]
            return super().write(memoryview(b)[: max(0, len(memoryview(b)) - 5)])

    with pytest.raises(OSError) as e:
        write_npy(Short(), np.zeros((4, 100), np.float32))
    assert e.value.errno == errno.ENOSPC


def test_a_full_disk_while_writing_a_shard_is_the_disk_full_line_and_the_rerun_repairs(tmp_path, monkeypatch):
    import builtins

    from uvit_cli.data import format as shard_format

    full = _disk_with_room_for(3000)

    def shard_files_on_a_full_disk(path, mode="r", *a, **k):
        if "w" in mode:
            return io.BufferedWriter(full(path, "wb"))
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(shard_format, "open", shard_files_on_a_full_disk, raising=False)
    out = tmp_path / "data"
    args = ("prepare", "shapes", "--out", out, "--n", "8", "--val", "2", "--resolution", "16")
    err = _error_line(_run(*args))
    shard = out / "shapes" / "train" / "shard-00000"
    assert f"{shard}/x.npy: the disk is full: free space and rerun the same command" in err, err
    assert not data.list_shards(out / "shapes" / "train") and not list(out.rglob(".tmp-*"))
    monkeypatch.undo()
    res = _run(*args)
    assert res.exit_code == 0, res.output
    assert len(data.FeatureDataset(out / "shapes")) == 8


@pytest.mark.parametrize("name", ["../escaped", "/abs/set", "", "a/b", ".."])
def test_a_set_name_is_one_folder_under_out(tmp_path, name):
    r = _run("prepare", "shapes", "--out", str(tmp_path / "feats"), "--name", name, "--n", "8")
    assert r.exit_code == 2 and "--name" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "feats").exists()
