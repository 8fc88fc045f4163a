"""Chart drawing for the synthetic chart-QA data (datagen/synth.py): a `Chart` (table + kind + style) -> a PNG.

Everything a question can ask about is drawn: the title, every category label, every value (percentages on pies
and donuts), and colours that have a plain name ("blue"), so each answer is readable from the image alone.
Drawing is pure: the same `Chart` always gives the same bytes (fixed dpi, no PNG metadata), which makes the
generator deterministic whatever the number of worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Chart kinds and the answer to "What type of chart is this?".
KIND_NAMES = {
    "pie": "pie",
    "donut": "donut",
    "funnel": "funnel",
    "bar": "vertical bar",
    "hbar": "horizontal bar",
    "line": "line",
}
KINDS = tuple(KIND_NAMES)
# Kinds drawn in one colour (the colour question asks about that colour); pies and donuts colour each slice.
SINGLE_COLOUR_KINDS = ("funnel", "bar", "hbar", "line")

# Palettes: the same colour names in different shades, so "blue" stays the right answer across palettes.
PALETTES: dict[str, dict[str, str]] = {
    "tableau": {"blue": "#1f77b4", "orange": "#ff7f0e", "green": "#2ca02c", "red": "#d62728",
                "purple": "#9467bd", "brown": "#8c564b", "pink": "#e377c2", "gray": "#7f7f7f"},
    "bright": {"blue": "#0044ff", "orange": "#ff8800", "green": "#00aa00", "red": "#ee0000",
               "purple": "#8800cc", "brown": "#884400", "pink": "#ff44aa", "gray": "#808080"},
    "deep": {"blue": "#1a3a8a", "orange": "#cc5500", "green": "#1b6e2a", "red": "#a50f15",
             "purple": "#54278f", "brown": "#5c3310", "pink": "#c2185b", "gray": "#555555"},
    "soft": {"blue": "#5b8fd6", "orange": "#f4a259", "green": "#66bb6a", "red": "#e57373",
             "purple": "#a58bd4", "brown": "#a1887f", "pink": "#f48fb1", "gray": "#9e9e9e"},
}
COLOUR_NAMES = tuple(PALETTES["tableau"])
FONTS = ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono")
BACKGROUNDS = ("#ffffff", "#fafafa", "#f4f4f0", "#eef2f7")
DPI = 100  # fixed: sizes are set in pixels, fonts in pixels converted to points


@dataclass(frozen=True)
class Style:
    """How a chart looks; none of it changes an answer except `colours` (named) and the drawn labels."""

    width: int                 # pixels
    height: int                # pixels
    font: str
    title_px: float            # title font height in pixels
    label_px: float            # category / value label font height in pixels
    palette: str
    colours: tuple[str, ...]   # colour names: one per category (pie, donut) or a single one
    title_loc: str = "center"  # left | center | right
    legend: bool = False       # pies and donuts: labels in a legend instead of next to the slices
    grid: bool = False
    background: str = "#ffffff"
    start_angle: int = 90      # pies and donuts


@dataclass(frozen=True)
class Chart:
    """One chart to draw: its table (title, labels, values, unit), its kind and its style."""

    id: str
    kind: str
    title: str
    labels: tuple[str, ...]
    values: tuple[float, ...]
    unit: str
    style: Style


def format_number(value: float) -> str:
    """The canonical short form of a value: "42", "2.5", "0.75" (no thousands separators)."""
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def format_value(value: float, unit: str) -> str:
    """A value as it is drawn and answered: "42", "42%" or "$42" style units kept short."""
    number = format_number(value)
    if unit == "%":
        return number + "%"
    if unit == "$":
        return "$" + number
    return number


def percentages(values: tuple[float, ...]) -> tuple[int, ...]:
    """Each value's share of the total, rounded to whole percent: what a pie or donut shows and is asked about."""
    total = sum(values)
    return tuple(int(round(100 * v / total)) for v in values)


def draw_chart(chart: Chart, path: str) -> None:
    """Render `chart` to a PNG of exactly style.width x style.height pixels.

    Text that would leave the image or overlap other text (long labels, small images) is shrunk step by step,
    so every label a question names stays on the image. The figure is drawn once per step and the last drawing
    is written as is (no second render for saving): drawing is most of the generator's time.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    s = chart.style
    fig = Figure(figsize=(s.width / DPI, s.height / DPI), dpi=DPI, facecolor=s.background)
    canvas = FigureCanvasAgg(fig)
    with matplotlib.rc_context({"font.family": s.font}):
        ax = fig.add_axes(_axes_box(chart, 1.0))
        ax.set_facecolor(s.background)
        _DRAW[chart.kind](ax, chart, _pt(s.label_px))
        _fit_pie(ax, chart, 1.0)
        title = fig.text(_TITLE_X[s.title_loc], 0.985, chart.title, ha=s.title_loc, va="top",
                         fontsize=_pt(s.title_px), weight="bold")
        for scale in _FIT_SCALES:
            if scale < 1.0:
                _rescale(ax, chart, scale)
            canvas.draw()
            width = title.get_window_extent(canvas.get_renderer()).width
            if width > 0.96 * s.width:  # a long title shrinks on its own, not with the labels
                title.set_fontsize(title.get_fontsize() * 0.95 * s.width / width)
                canvas.draw()
            if _text_fits(fig, canvas.get_renderer()):
                break
        rgba = canvas.buffer_rgba()
        Image.frombuffer("RGBA", (rgba.shape[1], rgba.shape[0]), bytes(rgba), "raw", "RGBA", 0, 1) \
            .convert("RGB").save(path, format="PNG")


_FIT_SCALES = (1.0, 0.85, 0.72, 0.6, 0.5)


def _rescale(ax, chart: Chart, scale: float) -> None:
    """Every label at `scale` times its size; pies shrink and legends narrow to make room."""
    size = _pt(chart.style.label_px * scale)
    ax.tick_params(labelsize=size)
    legend = ax.get_legend()
    for text in list(ax.texts) + (legend.get_texts() if legend else []):
        text.set_fontsize(size)
    ax.set_position(_axes_box(chart, scale))
    _fit_pie(ax, chart, scale)


def _fit_pie(ax, chart: Chart, scale: float) -> None:
    if chart.kind in ("pie", "donut") and not chart.style.legend:
        # Axis half-range so that radius * 1.08 (where labels start) + the longest label fits in the axes
        # (DejaVu glyphs average ~0.62 em); a smaller pie leaves room for the labels around it.
        half_width = 0.76 * chart.style.width / 2
        label = 0.62 * chart.style.label_px * scale * max(len(f"{lab} 100%") for lab in chart.labels)
        room = min(2.6, max(1.25, 1.08 / max(0.1, 1.0 - label / half_width)))
        ax.set_xlim(-room, room)
        ax.set_ylim(-room, room)


def _text_fits(fig, renderer) -> bool:
    """True when every visible text lies inside the image and no two texts overlap (after a draw)."""
    from matplotlib.text import Text

    width, height = fig.bbox.width, fig.bbox.height
    boxes = [t.get_window_extent(renderer).expanded(1.0, 1.0).padded(1.0)
             for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    for box in boxes:
        if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
            return False
    return not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


_TITLE_X = {"left": 0.02, "center": 0.5, "right": 0.98}


def _pt(px: float) -> float:
    return px * 72 / DPI


def _hex(chart: Chart, i: int = 0) -> str:
    return PALETTES[chart.style.palette][chart.style.colours[i % len(chart.style.colours)]]


def _axes_box(chart: Chart, scale: float) -> list[float]:
    """Axes rectangle in figure fractions: room at the top for the title, at the sides for tick labels."""
    s = chart.style
    top = 1 - (s.title_px * 1.5) / s.height
    if chart.kind in ("pie", "donut"):
        if s.legend:
            return [0.0, 0.02, 0.62 - 0.3 * (1.0 - scale), top - 0.02]  # the rest is the legend's
        return [0.12, 0.06, 0.76, top - 0.08]
    if chart.kind == "funnel":
        return [0.02, 0.02, 0.96, top - 0.03]
    left = 0.06
    if chart.kind == "hbar":  # room for the longest label (DejaVu glyphs average ~0.62 em) at the current scale
        longest = max(len(label) for label in chart.labels)
        left = min(0.45, (0.62 * s.label_px * scale * longest + 6) / s.width)
    bottom = (s.label_px * 2.0) / s.height if chart.kind in ("bar", "line") else 0.04
    return [left, bottom, 0.97 - left, top - bottom - 0.02]


def _pie(ax, chart: Chart, fontsize: float, width: float | None = None) -> None:
    shares = percentages(chart.values)
    colours = [_hex(chart, i) for i in range(len(chart.values))]
    wedge = {"edgecolor": chart.style.background, "linewidth": 0.5, **({"width": width} if width else {})}
    legend = chart.style.legend
    wedges, _ = ax.pie(chart.values, colors=colours, startangle=chart.style.start_angle, counterclock=False,
                       labels=None if legend else [f"{lab} {p}%" for lab, p in zip(chart.labels, shares, strict=True)],
                       textprops={"fontsize": fontsize}, wedgeprops=wedge, labeldistance=1.08)
    if legend:
        ax.legend(wedges, [f"{lab} {p}%" for lab, p in zip(chart.labels, shares, strict=True)], loc="center left",
                  bbox_to_anchor=(1.0, 0.5), fontsize=fontsize, frameon=False, handlelength=1.0)
    ax.set_aspect("equal")
    _no_axes(ax)


def _donut(ax, chart: Chart, fontsize: float) -> None:
    _pie(ax, chart, fontsize, width=0.45)


def _funnel(ax, chart: Chart, fontsize: float) -> None:
    """Centred horizontal bars, first stage on top; each stage shows its label and value."""
    n, top = len(chart.values), max(chart.values)
    ys = list(range(n))[::-1]
    ax.barh(ys, chart.values, left=[(top - v) / 2 for v in chart.values], color=_hex(chart), height=0.85)
    for y, label, value in zip(ys, chart.labels, chart.values, strict=True):
        ax.text(top / 2, y, f"{label}: {format_value(value, chart.unit)}", ha="center", va="center",
                fontsize=fontsize, color="black",
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "alpha": 0.7, "linewidth": 0})
    ax.set_xlim(0, top)
    ax.set_ylim(-0.6, n - 0.4)
    _no_axes(ax)


def _bars(ax, chart: Chart, fontsize: float, horizontal: bool) -> None:
    positions = range(len(chart.values))
    draw = ax.barh if horizontal else ax.bar
    bars = draw(positions, chart.values, color=_hex(chart), **({"height": 0.7} if horizontal else {"width": 0.7}))
    ax.bar_label(bars, labels=[format_value(v, chart.unit) for v in chart.values], fontsize=fontsize, padding=1)
    ticks = ax.set_yticks if horizontal else ax.set_xticks
    ticks(list(positions), list(chart.labels), fontsize=fontsize)
    (ax.invert_yaxis if horizontal else (lambda: None))()
    (ax.set_xticks if horizontal else ax.set_yticks)([])  # values are written on the bars
    limit = max(chart.values) * 1.22
    (ax.set_xlim if horizontal else ax.set_ylim)(0, limit)
    _clean_axes(ax, chart, axis="x" if horizontal else "y")


def _line(ax, chart: Chart, fontsize: float) -> None:
    positions = list(range(len(chart.values)))
    ax.plot(positions, chart.values, color=_hex(chart), marker="o", linewidth=2.0, markersize=4)
    low, high = min(chart.values), max(chart.values)
    pad = (high - low) * 0.3 or abs(high) * 0.3 or 1.0
    for x, v in zip(positions, chart.values, strict=True):
        ax.annotate(format_value(v, chart.unit), (x, v), textcoords="offset points", xytext=(0, fontsize * 0.5 + 2),
                    ha="center", fontsize=fontsize)
    ax.set_xticks(positions, list(chart.labels), fontsize=fontsize)
    ax.set_xlim(-0.5, len(positions) - 0.5)
    ax.set_ylim(low - pad, high + pad)
    ax.set_yticks([])  # values are written at the points
    _clean_axes(ax, chart, axis="y")


def _no_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.axis("off")


def _clean_axes(ax, chart: Chart, axis: str) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.spines["left" if axis == "y" else "bottom"].set_visible(False)
    ax.tick_params(length=0, pad=1)
    if chart.style.grid:
        ax.grid(axis=axis, color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)


_DRAW = {
    "pie": _pie,
    "donut": _donut,
    "funnel": _funnel,
    "bar": lambda ax, chart, fs: _bars(ax, chart, fs, horizontal=False),
    "hbar": lambda ax, chart, fs: _bars(ax, chart, fs, horizontal=True),
    "line": _line,
}
