"""`uvit report` / `write_report`: the run page's plots, grids and preset, from a run dir written as the
training loop writes one."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from uvit_cli.cli import app
from uvit_cli.errors import ConfigError
from uvit_cli.train.plot import MAX_POINTS, downsample
from uvit_cli.train.report import MAX_GRIDS, REPORT_FILE, write_report
from uvit_cli.train.rundir import MetricsLog, read_metrics

PRESETS = Path(__file__).resolve().parent.parent / "presets"
EVERY_STEP = ("loss", "lr", "img_per_s", "data_wait_ms")  # the keys of every log record


class Page(HTMLParser):
    """What the tests look at: each plot's polyline points, the img tags, the <pre> text, all attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.plots: dict[str, list[tuple[float, float]]] = {}
        self.imgs: list[dict[str, str]] = []
        self.attrs: list[tuple[str, str, str]] = []  # (tag, name, value)
        self.tags: list[str] = []
        self.pre = ""
        self.text = ""
        self._svg: str | None = None
        self._in_pre = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in a.items()]
        if tag == "svg":
            self._svg = a["data-series"]
        elif tag == "polyline" and self._svg is not None:
            pts = [p.split(",") for p in a["points"].split()]
            self.plots[self._svg] = [(float(x), float(y)) for x, y in pts]
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "pre":
            self._in_pre = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        self.text += data
        if self._in_pre:
            self.pre += data


def _record(step: int) -> dict[str, float]:
    """One log record with the fields and types `train/loop.py` writes."""
    return {
        "step": step,
        "epoch": step // 500,
        "loss": 0.2 + 0.8 * math.exp(-step / 3000) + 0.01 * math.sin(step),
        "lr": 2e-4 * min(1.0, (step - 10) / 1000),  # 0 at the first log step, as the warm-up starts at 0
        "img_per_s": 1000.0 + 50 * math.cos(step / 100),
        "data_wait_ms": 0.5 + 0.1 * math.sin(step / 7),
        "time": 1.7e9 + step,
    }


def make_run(
    root: Path, n: int = 300, fid: tuple[tuple[int, float], ...] = ((1000, 80.5), (2000, 41.25)), grids=(2,)
) -> Path:
    """A run dir: `n` log records every 10 steps (and the `fid` records) in metrics.jsonl through the
    loop's MetricsLog, a packaged preset, and one grid per entry of `grids` (4x4 of that many pixels)."""
    run = root / "run"
    (run / "samples").mkdir(parents=True)
    shutil.copy(PRESETS / "coco_uvit_s2_deep.toml", run / "preset.toml")
    log = MetricsLog(run, resume_step=0)
    fids = dict(fid)
    for i in range(1, n + 1):
        log.write(_record(10 * i))
        if 10 * i in fids:
            best = min(v for s, v in fid if s <= 10 * i)  # the fields of train/evaluate.py's record
            log.write({"step": 10 * i, "fid": fids[10 * i], "fid_n": 16, "fid_seconds": 1.5, "fid_best": best,
                       "fid_is_best": best == fids[10 * i]})  # fmt: skip
    for k, size in enumerate(grids):
        side = 4 * size + 5 * 2  # 4x4 images and the 2-pixel padding of train/grid.save_grid
        img = Image.new("RGB", (side, side + k), (10 * k, 100, 200))
        img.putpixel((3, 3), (255, 0, 0))
        img.save(run / "samples" / f"{1000 * (k + 1):08d}.png")
    return run


def _page(run: Path) -> Page:
    path = write_report(run)
    assert path == run / REPORT_FILE
    return Page(path.read_text(encoding="utf-8"))


def _affine(us: list[float], vs: list[float]) -> float:
    """Largest deviation of `vs` from the least-squares line through (us, vs), relative to vs's range."""
    n = len(us)
    mu, mv = sum(us) / n, sum(vs) / n
    cov = sum((u - mu) * (v - mv) for u, v in zip(us, vs, strict=True))
    var = sum((u - mu) ** 2 for u in us)
    slope = cov / var
    return max(abs(mv + slope * (u - mu) - v) for u, v in zip(us, vs, strict=True)) / (max(vs) - min(vs))


def test_every_series_is_a_polyline_of_its_points(tmp_path):
    run = make_run(tmp_path, n=300)
    page = _page(run)
    assert set(page.plots) == {*EVERY_STEP, "fid"}
    for key in EVERY_STEP:
        assert len(page.plots[key]) == 300, key
    assert len(page.plots["fid"]) == 2
    records = [_record(10 * i) for i in range(1, 301)]
    steps = [float(r["step"]) for r in records]
    for key, f in (("loss", math.log10), ("lr", float), ("img_per_s", float)):
        xs, ys = zip(*page.plots[key], strict=True)
        assert _affine(steps, list(xs)) < 1e-3, key  # x is the step, linearly
        values = [f(r[key]) for r in records]  # the loss on a log scale, the others linear
        assert _affine(values, list(ys)) < 2e-3, key  # (coordinates are rounded to 0.1 units)
        assert ys[values.index(max(values))] == min(ys), key  # SVG y grows downwards
    fx, fy = zip(*page.plots["fid"], strict=True)
    assert fy[0] < fy[1] and fx[0] < fx[1]  # 80.5 at step 1000 above 41.25 at step 2000
    assert "no FID yet" not in page.text and "best FID41.25at step 2,000" in page.text
    assert "coco_uvit_s2_deep" in page.text and "step 3,000" in page.text


def test_a_long_series_is_drawn_with_its_spikes(tmp_path):
    run = make_run(tmp_path, n=2500, fid=())
    with open(run / "metrics.jsonl", "a") as f:  # a spike in the middle of the run, out of step order
        f.write(json.dumps({**_record(12_345), "loss": 50.0}) + "\n")
    page = _page(run)
    for key in EVERY_STEP:
        assert len(page.plots[key]) == MAX_POINTS, key
    loss = page.plots["loss"]
    (x0, _), (x1, _) = loss[0], loss[-1]  # steps 10 and 25,000
    top = min(loss, key=lambda p: p[1])
    assert top[0] == pytest.approx(x0 + (12_345 - 10) / (25_000 - 10) * (x1 - x0), abs=0.2)
    assert [x for x, _ in loss] == sorted(x for x, _ in loss)
    assert "no FID yet" in page.text and "2,501 points, drawn as 1000" in page.text


def test_downsample_keeps_ends_and_extremes():
    xs = [float(i) for i in range(10_000)]
    ys = [math.sin(i / 50) for i in range(10_000)]
    ys[4321], ys[8765] = 9.0, -9.0
    dx, dy = downsample(xs, ys, 1000)
    assert len(dx) == 1000 and dx == sorted(dx)
    assert (dx[0], dx[-1]) == (0.0, 9999.0)
    assert 4321.0 in dx and 8765.0 in dx and max(dy) == 9.0 and min(dy) == -9.0
    assert all(ys[int(x)] == y for x, y in zip(dx, dy, strict=True))
    assert downsample(xs[:1000], ys[:1000], 1000) == (xs[:1000], ys[:1000])


def test_grids_are_the_source_pngs_newest_first(tmp_path):
    run = make_run(tmp_path, grids=(2, 8, 5))
    page = _page(run)
    assert [i["alt"] for i in page.imgs] == [f"sample grid at step {s}" for s in (3000, 2000, 1000)]
    for img, step in zip(page.imgs, (3000, 2000, 1000), strict=True):
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        data = base64.b64decode(img["src"][len(prefix) :], validate=True)
        assert data == (run / "samples" / f"{step:08d}.png").read_bytes()  # embedded as written
        with Image.open(io.BytesIO(data)) as im, Image.open(run / "samples" / f"{step:08d}.png") as src:
            assert im.format == "PNG" and im.size == src.size
            assert (int(img["width"]), int(img["height"])) == src.size
            assert im.convert("RGB").tobytes() == src.convert("RGB").tobytes()


def test_at_most_the_newest_grids_are_embedded(tmp_path):
    run = make_run(tmp_path, grids=(2,) * (MAX_GRIDS + 3))
    (run / "samples" / "00099000.png").write_bytes(b"not a png")  # skipped, not shown broken
    page = _page(run)
    steps = [int(i["alt"].rsplit(" ", 1)[1]) for i in page.imgs]
    assert steps == [1000 * k for k in range(MAX_GRIDS + 3, 3, -1)]
    assert "older ones are in samples/" in page.text


def test_the_preset_is_shown_escaped(tmp_path):
    run = make_run(tmp_path)
    preset = (run / "preset.toml").read_text() + '# a <script>alert("x")</script> & more\n'
    (run / "preset.toml").write_text(preset)
    raw = write_report(run).read_text()
    page = Page(raw)
    assert page.pre == preset  # the text, character for character
    assert "script" not in page.tags and "<script>" not in raw and "&lt;script&gt;" in raw
    assert 'name = "coco_uvit_s2_deep"' in preset and "name = &quot;coco_uvit_s2_deep&quot;" in raw


def test_nothing_is_fetched_from_outside(tmp_path):
    page = _page(make_run(tmp_path, grids=(2, 3)))
    assert page.imgs
    for tag, name, value in page.attrs:
        if name in ("src", "href", "xlink:href", "action", "data"):
            assert value.startswith("data:"), (tag, name, value[:40])
        assert "http:" not in value and "https:" not in value and "//" not in value[:10], (tag, name)
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)


def test_no_metrics_yet(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    shutil.copy(PRESETS / "shapes_uvit_tiny.toml", run / "preset.toml")  # what the loop writes first
    page = _page(run)
    assert "no metrics yet" in page.text and "no sample grids yet" in page.text
    assert not page.plots and not page.imgs and "shapes_uvit_tiny" in page.pre
    (run / "metrics.jsonl").write_text("")
    assert "no metrics yet" in _page(run).text


def test_a_cut_or_foreign_line_is_skipped(tmp_path):
    run = make_run(tmp_path, n=50, fid=())
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n" + json.dumps({"step": 600, "loss": "x", "lr": True}) + "\n")
        f.write('{"step": 610, "loss": 0.3, "lr"')  # a kill in the middle of a line
    page = _page(run)
    assert len(page.plots["loss"]) == 50 and len(page.plots["lr"]) == 50
    assert "step 600" in page.text  # its step counts, its non-numbers do not


def test_repeated_calls_follow_appends_and_rewrites(tmp_path):
    """In one process later calls parse only appended lines: a half-written line waits for its end, and a
    resume that rewrites the file (dropping lines past its checkpoint) starts over."""
    run = make_run(tmp_path, n=100, fid=())
    assert len(_page(run).plots["loss"]) == 100
    line = json.dumps(_record(1010))
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line[:20])
    assert len(_page(run).plots["loss"]) == 100
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line[20:] + "\n" + json.dumps({"step": 1010, "fid": 12.5}) + "\n")
    page = _page(run)
    assert len(page.plots["loss"]) == 101 and len(page.plots["fid"]) == 1
    MetricsLog(run, resume_step=500)  # what a resume from step 500 does
    page = _page(run)
    assert len(page.plots["loss"]) == 50 and "fid" not in page.plots and "step 500" in page.text


def test_not_a_run_dir(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a run directory"):
        write_report(tmp_path)
    assert not (tmp_path / REPORT_FILE).exists()


def test_cli_writes_the_page_and_prints_its_path(tmp_path):
    run = make_run(tmp_path)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(run / REPORT_FILE)
    assert len(Page((run / REPORT_FILE).read_text()).plots["loss"]) == 300
    r = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such run directory" in r.output


def _chromium() -> str | None:
    return next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
    )


@pytest.mark.slow
def test_a_browser_draws_the_page(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH (apt-get install chromium)")
    page = write_report(make_run(tmp_path, n=300, grids=(8, 8)))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1200,1600", page.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int32)
    assert rgb.shape == (1600, 1200, 3)
    assert rgb.mean(axis=2).var() > 100  # not a blank page
    # The curves sit below the header: the loss colour (#1f77b4) is drawn there, and much is not white.
    plots = rgb[200:900]
    blue = (np.abs(plots - np.array([0x1F, 0x77, 0xB4])) < 40).all(axis=2).sum()
    assert blue > 300, blue
    assert (plots != 255).any(axis=2).mean() > 0.02


def test_training_writes_the_page(tmp_path, shards, monkeypatch):
    from train_fixtures import tiny_preset

    from uvit_cli import train as train_pkg
    from uvit_cli.train.report import ReportWriter

    run = tmp_path / "run"
    train_pkg.train(tiny_preset(shards, steps=6, log_interval=2), run)
    page = Page((run / REPORT_FILE).read_text())
    logged = [m for m in read_metrics(run) if "loss" in m]  # steps 2, 3 (a checkpoint), 4, 6
    assert len(page.plots["loss"]) == len(logged) == 4 and "tiny" in page.pre  # step 6's page: forced

    calls = []
    monkeypatch.setattr("uvit_cli.train.report.write_report", lambda d: calls.append(d))
    w = ReportWriter(run, every_s=3600)
    assert w() is None and w() is None and w(force=True) is None
    assert len(calls) == 2  # the second call came within every_s; the forced one did not wait

    def full(_d):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("uvit_cli.train.report.write_report", full)
    assert "No space left" in (w(force=True) or "") and w(force=True) is None  # one warning, then quiet
