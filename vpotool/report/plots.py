"""Line plots as inline SVG strings, built in plain Python (no plotting library): axes with round-numbered ticks,
one path per series, hover titles on the points, and dashed vertical marks (e.g. reference-model updates)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

Point = tuple[float, float]

# Plot frame, in SVG user units: the data area is inset from the edges by these margins.
WIDTH, HEIGHT = 360, 200
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 24, 30
COLORS = ("#2f6fdf", "#e4572e", "#29a35a", "#9b5de5", "#f3a712", "#6c757d")
MAX_DOTS = 120  # above this many points per series, draw the line only


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` evenly spaced round numbers (steps of 1, 2, 2.5 or 5 times a power of ten) covering
    ``[lo, hi]``; the first is <= lo and the last >= hi. ``integer`` keeps the spacing >= 1."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:  # a flat series: open a small range around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(round(step), 1)
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [round(start + i * step, 12) for i in range(round((stop - start) / step) + 1)]


def scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    """The linear map taking ``lo -> a`` and ``hi -> b``."""
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) * (b - a) / span


def path_data(points: Sequence[Point], sx: Callable, sy: Callable) -> str:
    """SVG path ``d`` through ``points`` (already finite), in order, coordinates rounded to 0.1."""
    return " ".join(f"{'L' if i else 'M'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(points))


def label(v: float) -> str:
    """A tick label: short and without float noise (0.30000000000000004 -> 0.3)."""
    return f"{v:.4g}"


def line_plot(
    series: dict[str, Sequence[Point]],
    marks: Sequence[float] = (),
    xlabel: str = "step",
    mark_label: str = "reference update",
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """An SVG line chart of ``series`` (name -> ``(x, y)`` points; non-finite values are skipped) with a dashed
    vertical line at each x in ``marks``. Integer x values get integer ticks. Returns the ``<svg>`` element."""
    clean = {name: [(x, y) for x, y in pts if finite(x) and finite(y)] for name, pts in series.items()}
    clean = {name: pts for name, pts in clean.items() if pts}
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    parts = [f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    if not xs:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no data</text>')
        return "".join(parts) + "</svg>"
    integer = all(float(x).is_integer() for x in xs)
    xt = nice_ticks(min(xs), max(xs), 6, integer)
    yt = nice_ticks(min(ys), max(ys), 4)
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = xt[0], xt[-1]
    xt = [t for t in xt if x0 <= t <= x1] or [x0]
    sx = scale(x0, x1, LEFT, width - RIGHT)
    sy = scale(yt[0], yt[-1], height - BOTTOM, TOP)

    for t in yt:  # horizontal grid lines with labels
        y = sy(t)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">{label(t)}</text>')
    for t in xt:
        y = height - BOTTOM + 13
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{y}" text-anchor="middle">{label(t)}</text>')
    parts.append(f'<text class="axis" x="{width - RIGHT}" y="{height - 3}" text-anchor="end">{escape(xlabel)}</text>')
    axes = f"M{LEFT},{TOP} L{LEFT},{height - BOTTOM} L{width - RIGHT},{height - BOTTOM}"
    parts.append(f'<path class="axes" d="{axes}"/>')
    for m in marks:
        if x0 <= m <= x1:
            x = sx(m)
            parts.append(
                f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{height - BOTTOM}">'
                f"<title>{escape(mark_label)} at {xlabel} {label(m)}</title></line>"
            )
    for i, (name, pts) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        parts.append(f'<path class="line" stroke="{color}" d="{path_data(pts, sx, sy)}"/>')
        if len(pts) <= MAX_DOTS:
            for x, y in pts:
                parts.append(
                    f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                    f"<title>{escape(name)}: {label(y)} at {xlabel} {label(x)}</title></circle>"
                )
        if len(clean) > 1:  # legend, left to right along the top
            lx = LEFT + 8 + i * (width - LEFT - RIGHT) / len(clean)
            parts.append(f'<line x1="{lx:.1f}" x2="{lx + 14:.1f}" y1="10" y2="10" stroke="{color}" stroke-width="2"/>')
            parts.append(f'<text class="legend" x="{lx + 18:.1f}" y="13">{escape(name)}</text>')
    return "".join(parts) + "</svg>"
