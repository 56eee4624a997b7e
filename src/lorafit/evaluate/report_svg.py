"""The report's charts as inline SVG: line charts over optimizer steps and one grouped bar chart.

Why not matplotlib (which drew them until #19): a report has a handful of line charts, and matplotlib cost every run
about 1.2 s (0.5 s to import, 0.7 s to render five PNGs) and six packages of the install; an SVG line chart is a
polyline, axes and text. A ``Chart`` keeps what it draws (the series, the axis ranges), so a test reads the data
rather than pixels, and ``svg()`` writes it as text the page embeds as is: no script, no network, scalable.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

WIDTH, HEIGHT = 600, 330
LEFT, RIGHT, TOP, BOTTOM = 66, 14, 30, 42  # margins around the plot area, in px
GRID, AXIS, TEXT, MUTED = "#e3e6ea", "#9aa3ad", "#222", "#66707c"


@dataclass
class Line:
    label: str
    steps: list
    values: list
    color: str


@dataclass
class Chart:
    """A line chart (``lines``) or a grouped bar chart (``bars``: names, then (label, values, color) groups)."""

    title: str
    ylabel: str
    lines: list[Line] = field(default_factory=list)
    bars: tuple = ()
    ylim: tuple[float, float] = (0.0, 1.0)
    log_y: bool = False
    best: tuple | None = None  # (step, value, color): a dashed marker and its label

    @property
    def xlim(self) -> tuple[float, float]:
        steps = [s for line in self.lines for s in line.steps]
        lo, hi = min(steps), max(steps)
        return (lo - 1, hi + 1) if lo == hi else (lo, hi)

    def svg(self) -> str:
        esc = html.escape
        # inline in HTML5, an <svg> needs no namespace declaration (and the page names no URL at all)
        parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
                 f'aria-label="{esc(self.title)}" font-family="sans-serif" font-size="11">',
                 f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13" fill="{TEXT}">{esc(self.title)}'
                 "</text>",
                 f'<text transform="translate(14 {TOP + _height() / 2}) rotate(-90)" text-anchor="middle" '
                 f'fill="{MUTED}">{esc(self.ylabel)}</text>']
        for tick in self._yticks():
            y = self._y(tick)
            parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
                         f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end" fill="{MUTED}">{_number(tick)}'
                         "</text>")
        parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{_width()}" height="{_height()}" fill="none" '
                     f'stroke="{AXIS}"/>')
        parts += self._bar_parts() if self.bars else self._line_parts()
        parts.append(self._legend())
        parts.append("</svg>")
        return "".join(parts)

    # -------------------------------------------------------------------------------------- coordinates
    def _y(self, value: float) -> float:
        lo, hi = self.ylim
        if self.log_y:
            value, lo, hi = math.log10(value), math.log10(lo), math.log10(hi)
        return TOP + _height() * (1 - (value - lo) / ((hi - lo) or 1))

    def _x(self, step: float) -> float:
        lo, hi = self.xlim
        return LEFT + _width() * (step - lo) / ((hi - lo) or 1)

    def _yticks(self) -> list[float]:
        lo, hi = self.ylim
        if self.log_y:
            return [10.0 ** e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
        return nice_ticks(lo, hi)

    # -------------------------------------------------------------------------------------- marks
    def _line_parts(self) -> list[str]:
        parts = [f'<text x="{LEFT + _width() / 2}" y="{HEIGHT - 6}" text-anchor="middle" fill="{MUTED}">optimizer '
                 "step</text>"]
        for tick in nice_ticks(*self.xlim, integer=True):
            x = self._x(tick)
            parts.append(f'<text x="{x:.1f}" y="{TOP + _height() + 15}" text-anchor="middle" fill="{MUTED}">'
                         f"{_number(tick)}</text>")
        for line in self.lines:
            points = " ".join(f"{self._x(s):.1f},{self._y(v):.1f}" for s, v in zip(line.steps, line.values))
            parts.append(f'<polyline fill="none" stroke="{line.color}" stroke-width="1.6" points="{points}">'
                         f"<title>{html.escape(line.label)}</title></polyline>")
            if len(line.steps) < 30:
                parts += [f'<circle cx="{self._x(s):.1f}" cy="{self._y(v):.1f}" r="2.4" fill="{line.color}"/>'
                          for s, v in zip(line.steps, line.values)]
        if self.best is not None:
            step, value, color = self.best
            x = self._x(step)
            right = x > LEFT + _width() / 2
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + _height()}" stroke="{color}" '
                         f'stroke-dasharray="4 3"/><text x="{x + (-6 if right else 6):.1f}" y="{self._y(value) - 8:.1f}"'
                         f' text-anchor="{"end" if right else "start"}" font-size="10" fill="{color}">best '
                         f"{value:.4g} @ step {step}</text>")
        return parts

    def _bar_parts(self) -> list[str]:
        names, groups = self.bars
        slot = _width() / max(len(names), 1)
        width = slot * 0.8 / max(len(groups), 1)
        parts = []
        for i, name in enumerate(names):
            centre = LEFT + slot * (i + 0.5)
            y = TOP + _height() + 12  # slanted, as metric names are longer than their slot
            parts.append(f'<text x="{centre:.1f}" y="{y}" text-anchor="end" font-size="10" fill="{MUTED}" '
                         f'transform="rotate(-20 {centre:.1f} {y})">{html.escape(name)}</text>')
            for g, (_, values, color) in enumerate(groups):
                x = centre - slot * 0.4 + g * width
                top = self._y(values[i])
                parts.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" '
                             f'height="{TOP + _height() - top:.1f}" fill="{color}"/>'
                             f'<text x="{x + width / 2:.1f}" y="{top - 3:.1f}" text-anchor="middle" font-size="9" '
                             f'fill="{TEXT}">{values[i]:.2f}</text>')
        return parts

    def _legend(self) -> str:
        entries = [(label, color) for label, _, color in self.bars[1]] if self.bars else \
            [(line.label, line.color) for line in self.lines] if len(self.lines) > 1 else []
        parts = []
        for i, (label, color) in enumerate(entries):
            y = TOP + 12 + 14 * i
            parts.append(f'<line x1="{WIDTH - RIGHT - 150}" x2="{WIDTH - RIGHT - 136}" y1="{y - 4}" y2="{y - 4}" '
                         f'stroke="{color}" stroke-width="3"/><text x="{WIDTH - RIGHT - 132}" y="{y}" font-size="10" '
                         f'fill="{TEXT}">{html.escape(label)}</text>')
        return "".join(parts)


def _width() -> int:
    return WIDTH - LEFT - RIGHT


def _height() -> int:
    return HEIGHT - TOP - BOTTOM


def _number(value: float) -> str:
    return f"{value:.4g}" if value else "0"


def nice_ticks(lo: float, hi: float, *, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) between ``lo`` and ``hi``.

    >>> nice_ticks(0, 2001)
    [0, 500, 1000, 1500, 2000]
    """
    span = (hi - lo) or abs(hi) or 1.0
    raw = span / count
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def line_chart(title: str, ylabel: str, lines: list[Line], *, best=None, log_y: bool = False,
               unit_range: bool = False, from_zero: bool = False) -> Chart:
    """The y-range: 0 to 1 (``unit_range``), from 0 (``from_zero``: a 1 MB change on 2 GB must not fill the
    height), whole decades (``log_y``), else the data's range with a margin."""
    values = [v for line in lines for v in line.values]
    lo, hi = min(values), max(values)
    if unit_range:
        ylim = (-0.03, 1.03)
    elif from_zero:
        ylim = (0.0, 1.08 * hi or 1.0)
    elif log_y:
        ylim = (10.0 ** math.floor(math.log10(lo)), 10.0 ** math.ceil(math.log10(hi)))
        ylim = ylim if ylim[0] < ylim[1] else (ylim[0], ylim[1] * 10)
    else:
        pad = (hi - lo) * 0.06 or abs(hi) * 0.1 or 1.0
        ylim = (lo - pad, hi + pad)
    return Chart(title, ylabel, lines=lines, ylim=ylim, log_y=log_y, best=best)


def bar_chart(title: str, names: list[str], groups: list[tuple[str, list[float], str]]) -> Chart:
    """Grouped bars of rates (0 to 1), one group per (label, values, color)."""
    return Chart(title, "", bars=(names, groups), ylim=(0.0, 1.05))
