"""`<run_dir>/report.html`: a run's loss, learning rate, throughput, data wait and FID curves, its newest sample
grids and its preset, as one self-contained page (inline SVG plots, base64 PNGs, no script, no network).

Read from the run dir only: `metrics.jsonl` (every record with a finite number under a series' key is a
point of that series; FID records are `{"step": ..., "fid": ...}`), `samples/<step>.png` and `preset.toml`.
Stdlib only. Repeated calls in one process parse only the appended metrics lines and re-encode only new
grids: 10-20 ms a call for a run of 10,000 records and small grids (docs/training.md, *The run report*).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from uvit_cli import __version__
from uvit_cli.checkpoint import METRICS_FILE, PRESET_FILE, SAMPLES
from uvit_cli.errors import ConfigError
from uvit_cli.fileio import write_text_atomic
from uvit_cli.train.plot import MAX_POINTS, Series, fmt_number, svg_plot
from uvit_cli.train.rundir import metrics_record

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPORT_FILE = "report.html"
MAX_GRIDS = 8  # the newest grids embedded at full resolution, within MAX_GRID_BYTES of base64
MAX_GRID_BYTES = 8 << 20  # (the newest grid is embedded whatever its size)
LIVE_S = 600  # a run whose last record is younger than this gets a page that reloads itself every minute


SERIES = (
    Series("loss", "loss", "#1f77b4", log=True),
    Series("lr", "learning rate", "#2ca02c"),
    Series("img_per_s", "throughput (img/s)", "#ff7f0e"),
    Series("data_wait_ms", "data wait (ms per step)", "#9467bd"),
    Series("fid", "FID", "#d62728"),
)
_KEYS = tuple(s.key for s in SERIES)
_GRID_RE = re.compile(r"^(\d{8,})\.png$")
_MAX_TIME = 253402300799  # 9999-12-31 23:59:59 UTC: later Unix times are no date
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Inputs


def _parse_lines(lines: list[bytes]) -> list[Any]:
    """JSON values of non-empty lines; a cut or foreign line is skipped."""
    lines = [line for line in lines if line.strip()]
    try:  # one parse for all lines: 3x faster than one per line
        return list(json.loads(b"[" + b",".join(lines) + b"]"))
    except (ValueError, RecursionError):  # a line cut short by a kill, not UTF-8, nested absurdly deep
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except (ValueError, RecursionError):
                continue
        return out


# The largest magnitude a curve draws (and the smallest positive value of a log axis): the axes' arithmetic
# (spans, padding, ticks) stays finite within it. A record beyond it is no point of that curve.
PLOT_LIMIT = 1e100


def _finite(v: Any) -> TypeGuard[float]:
    return (type(v) is float or type(v) is int) and math.isfinite(v)  # type(): a bool is not a number


def _plottable(v: Any) -> TypeGuard[float]:
    return _finite(v) and abs(v) <= PLOT_LIMIT


class Metrics:
    """The series of one `metrics.jsonl`, read incrementally: `update()` parses only the complete lines
    appended since the previous call, and rereads the file when it was replaced (a resume rewrites it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reset(None)

    def _reset(self, ident: tuple[int, int] | None) -> None:
        self._ident, self._offset, self._tail = ident, 0, b""
        self._xs: dict[str, list[float]] = {k: [] for k in _KEYS}
        self._ys: dict[str, list[float]] = {k: [] for k in _KEYS}
        self._unsorted: set[str] = set()
        self.last_step: float | None = None
        self.last_time: float | None = None

    def update(self) -> Metrics:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            self._reset(None)
            return self
        with f:
            st = os.fstat(f.fileno())
            ident = (st.st_dev, st.st_ino)
            if ident != self._ident or st.st_size < self._offset:
                self._reset(ident)
            elif self._tail:  # the same file still: the bytes before the offset are the ones seen
                f.seek(self._offset - len(self._tail))
                if f.read(len(self._tail)) != self._tail:
                    self._reset(ident)
            f.seek(self._offset)
            new = f.read()
        cut = new.rfind(b"\n") + 1  # a line still being written waits for the next call
        if cut == 0:
            return self
        self._offset += cut
        self._tail = (self._tail + new[:cut])[-64:]
        self._add(_parse_lines(new[:cut].split(b"\n")))
        return self

    def _add(self, rows: list[Any]) -> None:
        xs, ys, unsorted = self._xs, self._ys, self._unsorted
        for value in rows:
            r = metrics_record(value)
            if r is None:
                continue
            x, t = r["step"], r.get("time")
            if _finite(t) and 0 <= t <= _MAX_TIME:
                self.last_time = t if self.last_time is None else max(self.last_time, t)
            if not _plottable(x):
                continue
            self.last_step = x if self.last_step is None else max(self.last_step, x)
            for k in _KEYS:
                y = r.get(k)
                if _plottable(y):
                    if xs[k] and x < xs[k][-1]:
                        unsorted.add(k)
                    xs[k].append(float(x))
                    ys[k].append(float(y))

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of every record holding a finite `key` and `step`, in step order."""
        if key in self._unsorted:  # stable: equal steps keep file order
            order = sorted(range(len(self._xs[key])), key=self._xs[key].__getitem__)
            self._xs[key] = [self._xs[key][i] for i in order]
            self._ys[key] = [self._ys[key][i] for i in order]
            self._unsorted.discard(key)
        return list(self._xs[key]), list(self._ys[key])


_METRICS: dict[Path, Metrics] = {}  # per metrics file: what this process has parsed of it so far


def load_metrics(run_dir: Path) -> Metrics:
    """The run's metrics, parsing only what was appended since this process last looked."""
    path = (run_dir / METRICS_FILE).resolve()
    if path not in _METRICS:
        _METRICS[path] = Metrics(path)
    return _METRICS[path].update()


@dataclass(frozen=True)
class Grid:
    step: int
    width: int
    height: int
    html: str  # a <figure> with the PNG file as a base64 <img>


def _b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


# Per grid file: (size, mtime_ns) and the grid it held then. Pruned to the grids a page shows.
_GRIDS: dict[Path, tuple[tuple[int, int], Grid | None]] = {}


def _grid(path: Path, step: int, stamp: tuple[int, int]) -> Grid | None:
    """The grid in a PNG file, or None for a file that is not a PNG or cannot be read."""
    if path not in _GRIDS or _GRIDS[path][0] != stamp:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        ok = data[:8] == _PNG_MAGIC and data[12:16] == b"IHDR"
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        _GRIDS[path] = stamp, (Grid(step, w, h, _grid_html(step, w, h, data)) if ok else None)
    return _GRIDS[path][1]


def _grid_html(step: int, w: int, h: int, png: bytes) -> str:
    scale = 256 // max(w, 1) if w < 128 else 1  # a tiny grid is enlarged, pixel for pixel
    style = f' style="width: {w * scale}px; height: {h * scale}px; image-rendering: pixelated"'
    return (
        f"<figure><figcaption>step {step:,} ({w}&times;{h})</figcaption>"
        f'<img alt="sample grid at step {step}" width="{w}" height="{h}"{style if scale > 1 else ""} '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"></figure>'
    )


def sample_grids(
    run_dir: Path, n: int = MAX_GRIDS, max_bytes: int = MAX_GRID_BYTES
) -> tuple[list[Grid], int]:
    """The newest grids, newest first: at most `n`, within `max_bytes` of base64 (the newest one always);
    and how many grid files there are. Unreadable or non-PNG files are skipped."""
    folder = (run_dir / SAMPLES).resolve()
    try:
        found = [(int(m[1]), p) for p in folder.iterdir() if (m := _GRID_RE.match(p.name))]
    except OSError:
        return [], 0
    grids: list[Grid] = []
    shown: set[Path] = set()
    size = 0
    for step, p in sorted(found, reverse=True):
        try:
            st = p.stat()
        except OSError:
            continue
        if len(grids) == n or (grids and size + _b64_len(st.st_size) > max_bytes):
            break
        g = _grid(p, step, (st.st_size, st.st_mtime_ns))
        if g is not None:
            grids.append(g)
            shown.add(p)
            size += _b64_len(st.st_size)
    for p in [p for p in _GRIDS if p.parent == folder and p not in shown]:
        del _GRIDS[p]  # memory stays bounded by what the page shows
    return grids, len(found)


# --------------------------------------------------------------------------------------------------
# The page

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.meta { color: #555; } .plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-weight: bold; margin-bottom: 0.2em; }
svg { max-width: 100%; height: auto; } .empty { color: #888; font-style: italic; }
table.last td { padding: 0 1em 0 0; } .grids img { max-width: 100%; border: 1px solid #ccc; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; } .grids figcaption { font-weight: normal; color: #555; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.9em; }
"""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _preset_info(text: str | None, fallback: str) -> tuple[str, int | None]:
    """(run name, train.steps) from the preset text; the dir name and None if it does not parse."""
    try:
        doc = tomllib.loads(text or "")
    except (tomllib.TOMLDecodeError, RecursionError):
        return fallback, None
    steps = doc.get("train", {}).get("steps") if isinstance(doc.get("train"), dict) else None
    name = doc.get("name")
    return (name if isinstance(name, str) and name else fallback), (steps if isinstance(steps, int) else None)


def render_report(run_dir: Path, now: float | None = None) -> str:
    """The report page of `run_dir` as HTML text."""
    now = time.time() if now is None else now
    e = html.escape
    m = load_metrics(run_dir)
    try:
        preset_text: str | None = (run_dir / PRESET_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        preset_text = None
    name, total = _preset_info(preset_text, run_dir.resolve().name)
    last_step = int(m.last_step or 0)
    live = m.last_time is not None and now - m.last_time < LIVE_S

    page = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="refresh" content="60">' if live else "",
        f"<title>{e(name)}: step {last_step:,}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(name)}</h1>",
    ]
    pct = 100 * last_step / total if total else 0.0
    meta = [f"step {last_step:,}" + (f" of {total:,} ({pct:.{1 if pct < 10 else 0}f}%)" if total else "")]
    if m.last_time is not None:
        meta.append(f"last record {_when(m.last_time)}")
    meta.append(f"page written {_when(now)}" + (" (reloads every minute)" if live else ""))
    page.append(f'<p class="meta">{e(str(run_dir))} &middot; {" &middot; ".join(meta)}</p>')

    series = {s.key: m.series(s.key) for s in SERIES}
    if not any(xs for xs, _ in series.values()):
        page.append('<p class="empty">no metrics yet</p>')
    else:
        rows = [
            f"<tr><td>{e(s.title)}</td><td>{fmt_number(ys[-1])}</td><td>at step {xs[-1]:,.0f}</td></tr>"
            for s in SERIES
            for xs, ys in [series[s.key]]
            if xs
        ]
        fx, fy = series["fid"]
        if fy:  # lower is better
            i = fy.index(min(fy))
            rows.append(
                f"<tr><td>best FID</td><td>{fmt_number(fy[i])}</td><td>at step {fx[i]:,.0f}</td></tr>"
            )
        page.append(f'<table class="last">{"".join(rows)}</table>')
        page.append('<h2>Curves</h2><div class="plots">')
        for s in SERIES:
            xs, ys = series[s.key]
            if xs:
                n = f"{len(xs):,} points" + (f", drawn as {MAX_POINTS}" if len(xs) > MAX_POINTS else "")
                page.append(f'<figure><figcaption>{e(s.title)} <span class="meta">({n})</span></figcaption>')
                page.append(svg_plot(s, xs, ys, float(last_step)) + "</figure>")
            elif s.key == "fid":
                page.append('<figure><figcaption>FID</figcaption><p class="empty">no FID yet</p></figure>')
        page.append("</div>")

    grids, found = sample_grids(run_dir)
    page.append("<h2>Sample grids</h2>")
    if grids:
        older = f"; {found - len(grids)} older ones are in {SAMPLES}/" if found > len(grids) else ""
        page.append(f'<p class="meta">newest first{older}</p>')
        page += ['<div class="grids">', *(g.html for g in grids), "</div>"]
    else:
        page.append('<p class="empty">no sample grids yet</p>')

    page.append(f"<h2>Preset ({PRESET_FILE})</h2>")
    page.append(f"<pre>{e(preset_text)}</pre>" if preset_text is not None else '<p class="empty">none</p>')
    page.append(
        f'<p class="meta">uvit {__version__} &middot; <code>uvit report {e(str(run_dir))}</code> '
        "rewrites this page</p>\n</body></html>\n"
    )
    return "\n".join(p for p in page if p)


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.html` (atomically) from the run dir's files; returns its path.

    Raises ConfigError if `run_dir` is not a run directory, OSError if the page cannot be written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not any((run_dir / f).exists() for f in (PRESET_FILE, METRICS_FILE, SAMPLES)):
        raise ConfigError(
            f"{run_dir} is not a run directory (no {PRESET_FILE}, {METRICS_FILE} or {SAMPLES}/)"
        )
    path = run_dir / REPORT_FILE
    write_text_atomic(path, render_report(run_dir))
    return path


class ReportWriter:
    """`write_report` for the training loop: at most every `every_s` seconds unless forced (grids, FID, the
    end); a page that cannot be written is one warning, once, and training goes on."""

    def __init__(self, run_dir: Path, every_s: float = 30.0) -> None:
        self.run_dir, self.every_s = Path(run_dir), every_s
        self.last = -float("inf")
        self.failed = False

    def __call__(self, force: bool = False) -> str | None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return None
        self.last = now
        try:
            write_report(self.run_dir)
        except OSError as e:
            if self.failed:
                return None
            self.failed = True
            return f"could not write {self.run_dir / REPORT_FILE} ({e}); training goes on without it"
        return None
