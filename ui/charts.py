"""Small inline SVG charts (pure functions, unit-tested).

Plain SVG instead of a plotting component: it renders instantly on every refresh without a plotting
library, and its colours come from CSS classes (ui/static/ui.css), so it follows the browser's dark or
light mode. Every chart has a <title> per mark, so hovering shows the exact value.
"""

from __future__ import annotations

from html import escape

W, H = 360, 120  # viewBox units; the SVG scales to its container's width
PAD_L, PAD_B, PAD_T = 34, 16, 8


def method_class(method: str) -> str:
    """CSS class for a method's colour: m-ar, m-domino, m-domino-ngram, ..."""
    return "m-" + "".join(c if c.isalnum() else "-" for c in method)


def _frame(body: str, label: str, y_max: float, y_fmt: str) -> str:
    top, bottom = PAD_T, H - PAD_B
    axis = (f'<line class="dm-axis" x1="{PAD_L}" y1="{bottom}" x2="{W}" y2="{bottom}"/>'
            f'<text class="dm-tick" x="{PAD_L - 4}" y="{top + 8}" text-anchor="end">{format(y_max, y_fmt)}</text>'
            f'<text class="dm-tick" x="{PAD_L - 4}" y="{bottom}" text-anchor="end">0</text>')
    return (f'<svg class="dm-chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(label)}">'
            f"{axis}{body}</svg>")


def bars(values: list[float], *, label: str, y_max: float = 1.0, y_fmt: str = ".0%",
         names: list[str] | None = None, css: str = "dm-bar") -> str:
    """Vertical bars, one per value (e.g. acceptance at draft position 1..K)."""
    if not values:
        return empty(label)
    y_max = max(y_max, max(values)) or 1.0
    n = len(values)
    slot = (W - PAD_L) / n
    bottom, span = H - PAD_B, H - PAD_B - PAD_T
    marks = []
    for i, v in enumerate(values):
        h = span * max(v, 0) / y_max
        x = PAD_L + i * slot + slot * 0.15
        name = names[i] if names else str(i + 1)
        marks.append(f'<rect class="{css}" x="{x:.1f}" y="{bottom - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}">'
                     f"<title>{escape(name)}: {format(v, y_fmt)}</title></rect>")
        if n <= 24:
            marks.append(f'<text class="dm-tick" x="{x + slot * 0.35:.1f}" y="{H - 3}" text-anchor="middle">'
                         f"{escape(name)}</text>")
    return _frame("".join(marks), label, y_max, y_fmt)


def dots(points: list[tuple[float, str, str]], *, label: str, y_fmt: str = ".1f") -> str:
    """One dot per request, oldest left: (value, method, tooltip). Joined by a faint line."""
    if not points:
        return empty(label)
    y_max = max(p[0] for p in points) * 1.1 or 1.0
    n = len(points)
    step = (W - PAD_L - 8) / max(n - 1, 1)
    bottom, span = H - PAD_B, H - PAD_B - PAD_T
    xy = [(PAD_L + 4 + i * step, bottom - span * max(v, 0) / y_max) for i, (v, _, _) in enumerate(points)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    marks = [f'<polyline class="dm-line" points="{line}"/>'] if n > 1 else []
    for (x, y), (v, method, tip) in zip(xy, points):
        marks.append(f'<circle class="dm-dot {method_class(method)}" cx="{x:.1f}" cy="{y:.1f}" r="3.2">'
                     f"<title>{escape(tip)}</title></circle>")
    return _frame("".join(marks), label, y_max, y_fmt)


def empty(label: str) -> str:
    return (f'<svg class="dm-chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(label)}">'
            f'<text class="dm-tick" x="{W / 2}" y="{H / 2}" text-anchor="middle">no data yet</text></svg>')


def legend(methods: list[str]) -> str:
    return "".join(f'<span class="dm-legend"><i class="{method_class(m)}"></i>{escape(m)}</span>' for m in methods)
