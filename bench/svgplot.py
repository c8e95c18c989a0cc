"""A latency-over-time plot as a self-contained SVG (no plotting library in the project for one figure).

Log-scale y (milliseconds), linear x (seconds since start); one coloured series per case, each
call a dot, its time-to-ready a dashed vertical line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 1000, 480
LEFT, RIGHT, TOP, BOTTOM = 70, 260, 40, 50
COLOURS = ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd")


@dataclass
class Series:
    label: str
    points: Sequence[tuple[float, float]]  # (seconds since start, latency in seconds)
    ready: float | None = None


def _ticks(low: float, high: float) -> list[float]:
    return [10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]


def render(series: Sequence[Series], title: str) -> str:
    xs = [x for s in series for x, _ in s.points] + [s.ready or 0.0 for s in series]
    ys = [max(y * 1e3, 1e-3) for s in series for _, y in s.points]
    x_max = max(xs) * 1.02 or 1.0
    y_ticks = _ticks(min(ys), max(ys))
    y_lo, y_hi = math.log10(y_ticks[0]), math.log10(y_ticks[-1])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + x / x_max * plot_w

    def py(ms: float) -> float:
        return TOP + (y_hi - math.log10(max(ms, 1e-3))) / (y_hi - y_lo) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']
    for tick in y_ticks:
        y = py(tick)
        label = f"{tick:g} ms" if tick < 1000 else f"{tick / 1000:g} s"
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    step = max(1, round(x_max / 10))
    for sec in range(0, int(x_max) + 1, step):
        x = px(sec)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{sec}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">'
               "seconds since the model server was launched</text>")
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y * 1e3):.1f}" for x, y in s.points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1" opacity="0.6"/>')
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y * 1e3):.1f}" r="1.8" fill="{colour}"/>' for x, y in s.points)
        if s.ready is not None:
            x = px(s.ready)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="{colour}" '
                       'stroke-dasharray="5,4"/>')
        ly = TOP + 20 + 36 * i
        out.append(f'<circle cx="{LEFT + plot_w + 16}" cy="{ly - 4}" r="5" fill="{colour}"/>')
        out.append(f'<text x="{LEFT + plot_w + 26}" y="{ly}">{escape(s.label)}</text>')
        if s.ready is not None:
            out.append(f'<text x="{LEFT + plot_w + 26}" y="{ly + 15}" fill="#555">ready at {s.ready:.1f} s '
                       "(dashed)</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
