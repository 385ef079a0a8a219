"""Line plots as inline SVG for the run report (`train/report.py`): round-numbered ticks, a log axis for positive
series, at most `MAX_POINTS` points per plot with every spike kept. Stdlib only."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

MAX_POINTS = 1000  # per plot; longer series keep their first and last point and each bucket's min and max


@dataclass(frozen=True)
class Series:
    key: str
    title: str
    colour: str
    log: bool = False  # log-scale y when every value is positive


def downsample(xs: list[float], ys: list[float], n: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most `n` points (n >= 4): the first, the last, and the min and max of each of (n - 2) // 2 buckets
    of the rest, in order, so that spikes survive. Series of at most `n` points are returned unchanged."""
    if len(xs) <= n:
        return xs, ys
    inner, buckets = len(xs) - 2, (n - 2) // 2
    keep = [0]
    for b in range(buckets):
        lo, hi = 1 + b * inner // buckets, 1 + (b + 1) * inner // buckets  # >= 2 items: inner > 2 * buckets
        seg = ys[lo:hi]
        i_min, i_max = lo + seg.index(min(seg)), lo + seg.index(max(seg))
        keep += (lo, hi - 1) if i_min == i_max else (min(i_min, i_max), max(i_min, i_max))
    keep.append(len(xs) - 1)
    return [xs[i] for i in keep], [ys[i] for i in keep]


def fmt_number(v: float) -> str:
    """A short label: 0.0002 -> 2e-4, 1234.5 -> 1234.5, 1.5e6 -> 1.5e6."""
    a = abs(v)
    if a == 0:
        return "0"
    if 1e-3 <= a < 1e5:
        return f"{v:.4g}"
    m, e = f"{v:.2e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def fmt_step(v: float) -> str:
    """A step count: 2500 -> 2.5k, 1200000 -> 1.2M."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.4g}{unit}"
    return f"{v:.4g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round-numbered ticks (1, 2, 2.5, 5 x 10^k apart) covering [lo, hi], about `n` of them."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    digits = 12 - math.floor(math.log10(step))  # 12 significant digits of the step, whatever its size
    return [round(k * step, digits) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis on [lo, hi] > 0: decades, else 1-2-5 or 1..9 multiples, else linear ones."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in mults]
        ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if len(ticks) >= 3:
            stride = math.ceil(len(ticks) / 8)
            return ticks[::stride]
    return [t for t in nice_ticks(lo, hi, 4) if t > 0]


W, H = 560, 240  # plot size in SVG units, margins included
ML, MR, MT, MB = 58, 14, 10, 28


def svg_plot(s: Series, xs: list[float], ys: list[float], x_max: float) -> str:
    """One series as an inline SVG: axes, ticks and grid lines, a polyline, a marker on the last point."""
    xs, ys = downsample(xs, ys)
    log = s.log and min(ys) >= 1e-100  # a log axis down to 1e-100 (its padding stays a float)
    f = math.log10 if log else float
    lo, hi = min(ys), max(ys)
    if log:
        pad = max((math.log10(hi) - math.log10(lo)) * 0.04, 0.02)
        lo, hi = 10 ** (math.log10(lo) - pad), 10 ** (math.log10(hi) + pad)
        yticks = log_ticks(lo, hi)
    else:
        if hi - lo <= 1e-12 * max(abs(hi), 1e-300):
            lo, hi = (lo - abs(lo) * 0.1, hi + abs(hi) * 0.1) if abs(lo) >= 1e-100 else (-1.0, 1.0)
        yticks = nice_ticks(lo, hi)
        step = yticks[1] - yticks[0] if len(yticks) > 1 else hi - lo
        lo, hi = min(lo, math.floor(lo / step + 1e-9) * step), max(hi, math.ceil(hi / step - 1e-9) * step)
        yticks = nice_ticks(lo, hi)
    x0, x1 = min(0.0, xs[0]), max(x_max, xs[-1])
    x1 = x1 if x1 > x0 else x0 + 1
    f0, f1 = f(lo), f(hi)
    pw, ph = W - ML - MR, H - MT - MB

    def px(x: float) -> float:
        return ML + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return MT + ph - (f(y) - f0) / (f1 - f0) * ph

    out = [
        f'<svg data-series="{s.key}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'aria-label="{html.escape(s.title)} against step" font-size="11" font-family="sans-serif">',
        f'<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="#fff" stroke="#888"/>',
    ]
    for t in yticks:
        y = py(t)
        out.append(f'<line x1="{ML}" x2="{ML + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{ML - 5}" y="{y + 4:.1f}" text-anchor="end">{fmt_number(t)}</text>')
    for t in nice_ticks(x0, x1):
        x = px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MT}" y2="{MT + ph}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{x:.1f}" y="{MT + ph + 16}" text-anchor="middle">{fmt_step(t)}</text>')
    out.append(f'<text x="{ML + pw}" y="{H - 1}" text-anchor="end" fill="#666">step</text>')
    if log:
        out.append(f'<text x="4" y="{H - 1}" fill="#666">log scale</text>')
    pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys, strict=True))
    out.append(f'<polyline points="{pts}" fill="none" stroke="{s.colour}" stroke-width="1.5"/>')
    marks = range(len(xs)) if len(xs) <= 50 else [len(xs) - 1]
    for i in marks:
        out.append(
            f'<circle cx="{px(xs[i]):.1f}" cy="{py(ys[i]):.1f}" r="2.5" fill="{s.colour}">'
            f"<title>step {xs[i]:.0f}: {fmt_number(ys[i])}</title></circle>"
        )
    out.append("</svg>")
    return "\n".join(out)
