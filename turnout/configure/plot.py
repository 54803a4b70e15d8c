"""The Pareto frontier as an inline SVG: output tokens/s per GPU against ITL, one series per
mode, the ITL target as a dashed line and the chosen layout ringed. Plain SVG, no script, so the
page needs nothing from outside.
"""

from __future__ import annotations

import math
from html import escape

from turnout.configure.layout import FrontierPoint, Layout

WIDTH, HEIGHT = 640, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 50
COLOURS = {"aggregated": "#1f77b4", "disaggregated": "#d95f02"}


def nice_ticks(top: float, bottom: float = 0.0, count: int = 5) -> list[float]:
    """Round tick values from at most `bottom` to at least `top`."""
    if top <= bottom:
        return [bottom, bottom + 1.0]
    raw = (top - bottom) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(bottom / step + 1e-9)
    return [i * step for i in range(first, math.ceil(top / step - 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:g}" if value >= 1 or value == 0 else f"{value:.2g}"


def svg(points: list[FrontierPoint], chosen: Layout) -> str:
    """The plot. The chosen layout is placed at its throughput per GPU it uses (the frontier's
    unit), which is its per-budget figure when it uses every GPU."""
    target = chosen.request.itl_ms
    chosen_y = chosen.tokens_per_s_per_gpu * chosen.request.gpus / max(1, chosen.gpus_used)
    xs = [p.itl_ms for p in points] + [target, chosen.itl_ms]
    ys = [p.tokens_per_s_per_gpu for p in points] + [chosen_y]
    # ITL from a little under the lowest point: strict-SLA frontiers crowd below the target.
    span = max(xs) - min(xs)
    x_ticks = nice_ticks(max(xs) + 0.05 * span + 1e-6, max(0.0, min(xs) - 0.1 * span - 1e-6))
    y_ticks = nice_ticks(max(ys) * 1.1)
    x_min, x_max, y_max = x_ticks[0], x_ticks[-1], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + plot_w * (x - x_min) / (x_max - x_min)

    def py(y: float) -> float:
        return TOP + plot_h * (1 - y / y_max)

    out = [f'<svg id="pareto-plot" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
           f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
           'aria-label="Pareto frontier: output tokens per second per GPU against ITL">',
           f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
           'stroke="#999"/>']
    for t in x_ticks:
        out.append(f'<line x1="{px(t):.1f}" y1="{TOP + plot_h}" x2="{px(t):.1f}" '
                   f'y2="{TOP + plot_h + 5}" stroke="#333"/>'
                   f'<text x="{px(t):.1f}" y="{TOP + plot_h + 18}" font-size="11" '
                   f'text-anchor="middle">{_fmt(t)}</text>')
    for t in y_ticks:
        out.append(f'<line x1="{LEFT - 5}" y1="{py(t):.1f}" x2="{LEFT + plot_w}" '
                   f'y2="{py(t):.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{LEFT - 8}" y="{py(t) + 4:.1f}" font-size="11" '
                   f'text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 10}" font-size="12" '
               'text-anchor="middle">ITL (ms per output token)</text>'
               f'<text x="16" y="{TOP + plot_h / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 16 {TOP + plot_h / 2})">output tokens/s per GPU</text>')
    out.append(f'<line id="itl-target" x1="{px(target):.1f}" y1="{TOP}" x2="{px(target):.1f}" '
               f'y2="{TOP + plot_h}" stroke="#c00" stroke-dasharray="5 4"/>'
               f'<text x="{px(target) - 4:.1f}" y="{TOP + 14}" font-size="11" fill="#c00" '
               f'text-anchor="end">ITL target {_fmt(target)} ms</text>')
    legend_y = TOP + 14
    for mode, colour in COLOURS.items():
        series = sorted((p for p in points if p.mode == mode), key=lambda p: p.itl_ms)
        if series:
            path = " ".join(f"{px(p.itl_ms):.1f},{py(p.tokens_per_s_per_gpu):.1f}"
                            for p in series)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                       'stroke-width="1.5"/>')
        for p in series:
            out.append(f'<circle class="point {mode}" cx="{px(p.itl_ms):.1f}" '
                       f'cy="{py(p.tokens_per_s_per_gpu):.1f}" r="3.5" fill="{colour}">'
                       f'<title>{escape(mode)}: ITL {p.itl_ms:.1f} ms, TTFT {p.ttft_ms:.0f} ms, '
                       f'{p.tokens_per_s_per_gpu:.1f} tokens/s/GPU on {p.gpus} GPUs</title>'
                       '</circle>')
        out.append(f'<circle cx="{LEFT + 14}" cy="{legend_y - 4}" r="4" fill="{colour}"/>'
                   f'<text x="{LEFT + 24}" y="{legend_y}" font-size="12">{mode} '
                   f'({len(series)})</text>')
        legend_y += 16
    out.append(f'<circle id="chosen-point" cx="{px(chosen.itl_ms):.1f}" cy="{py(chosen_y):.1f}" '
               'r="9" fill="none" stroke="#000" stroke-width="2">'
               f'<title>chosen: {escape(chosen.summary())}</title></circle>'
               f'<text x="{LEFT + 14}" y="{legend_y + 2}" font-size="12">◯ chosen layout</text>')
    out.append("</svg>")
    return "".join(out)
