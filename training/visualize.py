"""Ranking pictures: a query crop, then its top-k gallery crops framed green (same person) or red."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.data import Sample, load_rgb

CELL_W, CELL_H = 64, 128
BORDER, GAP, LABEL_H = 4, 6, 14
GREEN, RED, GREY, WHITE = (30, 170, 60), (210, 40, 40), (120, 120, 120), (255, 255, 255)


def _framed(path: str, colour) -> Image.Image:
    crop = load_rgb(path).resize((CELL_W, CELL_H), Image.BILINEAR)
    cell = Image.new("RGB", (CELL_W + 2 * BORDER, CELL_H + 2 * BORDER), colour)
    cell.paste(crop, (BORDER, BORDER))
    return cell


def ranking_strip(query: Sample, ranked: list[Sample], distances: list[float]) -> Image.Image:
    """One row: the query (grey frame) | its ranked gallery crops, each labelled with rank and distance."""
    cell_w, cell_h = CELL_W + 2 * BORDER, CELL_H + 2 * BORDER
    width = cell_w * (len(ranked) + 1) + GAP * (len(ranked) + 1)
    canvas = Image.new("RGB", (width, cell_h + LABEL_H), WHITE)
    draw = ImageDraw.Draw(canvas)
    canvas.paste(_framed(query.path, GREY), (0, LABEL_H))
    draw.text((2, 1), f"q id {query.pid}", fill=(0, 0, 0))
    x = cell_w + 2 * GAP
    for rank, (item, dist) in enumerate(zip(ranked, distances), start=1):
        canvas.paste(_framed(item.path, GREEN if item.pid == query.pid else RED), (x, LABEL_H))
        draw.text((x + 2, 1), f"{rank}: {dist:.2f}", fill=(0, 0, 0))
        x += cell_w + GAP
    return canvas


def write_rankings(
    distmat: np.ndarray,
    query: list[Sample],
    gallery: list[Sample],
    out_dir: str | Path,
    num_queries: int = 8,
    top_k: int = 10,
) -> list[Path]:
    """Draw ``num_queries`` queries spread over the query set; the Market-1501 protocol's removed
    entries (same person, same camera) are left out of the ranking as in the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = np.unique(np.linspace(0, len(query) - 1, num=min(num_queries, len(query))).round().astype(int))
    g_pids = np.array([s.pid for s in gallery])
    g_cams = np.array([s.camid for s in gallery])
    written = []
    for qi in picks:
        q = query[qi]
        order = np.argsort(distmat[qi], kind="stable")
        order = order[~((g_pids[order] == q.pid) & (g_cams[order] == q.camid))][:top_k]
        strip = ranking_strip(q, [gallery[i] for i in order], [float(distmat[qi, i]) for i in order])
        path = out_dir / f"query_{qi:05d}_id{q.pid}.png"
        strip.save(path)
        written.append(path)
    return written


PLOT_W, PLOT_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 720, 240, 56, 16, 44, 34
GENUINE_FILL, IMPOSTOR_FILL, THRESHOLD_COLOUR = (30, 170, 60), (210, 40, 40), (20, 20, 20)
LOG_FLOOR = 1e-6  # the log axis shows fractions down to one pair in a million


def score_histograms(histogram: dict, threshold: float | None, title: str) -> Image.Image:
    """Genuine (green) and impostor (red) score distributions, each normalised to its own total,
    on a linear axis (the shapes) above a log axis (the impostor tail that sets the threshold),
    with the threshold as a vertical line. ``histogram`` is ``calibration.score_histogram``'s."""
    view = _visible_range(histogram, threshold)
    panels = [_histogram_panel(histogram, threshold, view, log=False), _histogram_panel(histogram, threshold, view, log=True)]
    canvas = Image.new("RGB", (PLOT_W, MARGIN_T + sum(p.height for p in panels)), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(0, 0, 0))
    x = MARGIN_L
    for name, colour in (("same person, other camera", GENUINE_FILL), ("different people", IMPOSTOR_FILL)):
        draw.rectangle((x, 25, x + 10, 35), fill=colour)
        draw.text((x + 14, 24), name, fill=(0, 0, 0))
        x += 14 + int(draw.textlength(name)) + 24
    if threshold is not None:
        draw.line((x, 30, x + 12, 30), fill=THRESHOLD_COLOUR, width=2)
        draw.text((x + 16, 24), f"threshold {threshold:.3f}", fill=(0, 0, 0))
    y = MARGIN_T
    for panel in panels:
        canvas.paste(panel, (0, y))
        y += panel.height
    return canvas


def _visible_range(histogram: dict, threshold: float | None) -> tuple[float, float]:
    """The score range holding every non-empty bin (and the threshold), widened to quarter steps."""
    lo, hi = histogram["range"]
    width = (hi - lo) / histogram["bins"]
    used = np.flatnonzero(np.asarray(histogram["genuine"]) + np.asarray(histogram["impostor"]))
    if used.size == 0:
        return lo, hi
    first, last = lo + used[0] * width, lo + (used[-1] + 1) * width
    if threshold is not None:
        first, last = min(first, threshold), max(last, threshold)
    return max(lo, np.floor(first * 4) / 4), min(hi, np.ceil(last * 4) / 4)


def _histogram_panel(histogram: dict, threshold: float | None, view: tuple[float, float], log: bool) -> Image.Image:
    lo, hi = histogram["range"]
    bins = histogram["bins"]
    view_lo, view_hi = view
    fractions = {}
    for name in ("genuine", "impostor"):
        counts = np.asarray(histogram[name], dtype=np.float64)
        fractions[name] = counts / max(counts.sum(), 1)
    panel = Image.new("RGB", (PLOT_W, PLOT_H), WHITE)
    draw = ImageDraw.Draw(panel, "RGBA")
    left, right, top, bottom = MARGIN_L, PLOT_W - MARGIN_R, 6, PLOT_H - MARGIN_B
    peak = max(f.max() for f in fractions.values()) or 1.0

    def y_of(value: float) -> float:
        if log:
            span = np.log10(peak) - np.log10(LOG_FLOOR)
            return bottom - (np.log10(max(value, LOG_FLOOR)) - np.log10(LOG_FLOOR)) / span * (bottom - top)
        return bottom - value / peak * (bottom - top)

    def x_of(score: float) -> float:
        return left + (score - view_lo) / (view_hi - view_lo) * (right - left)

    bin_width = (hi - lo) / bins
    for name, colour in (("impostor", IMPOSTOR_FILL), ("genuine", GENUINE_FILL)):
        for i, value in enumerate(fractions[name]):
            start = lo + i * bin_width
            if value > (LOG_FLOOR if log else 0) and view_lo <= start < view_hi:
                draw.rectangle((x_of(start), y_of(value), x_of(start + bin_width) - 1, bottom), fill=colour + (120,))
    draw.line((left, bottom, right, bottom), fill=(0, 0, 0))
    draw.line((left, top, left, bottom), fill=(0, 0, 0))
    step = 0.1 if view_hi - view_lo <= 1.0 else 0.25
    for tick in np.arange(view_lo, view_hi + step / 2, step):
        x = x_of(tick)
        draw.line((x, bottom, x, bottom + 4), fill=(0, 0, 0))
        draw.text((x - 12, bottom + 6), f"{tick:.2f}", fill=(0, 0, 0))
    axis = "fraction of pairs, log scale" if log else "fraction of pairs"
    draw.text((right - 360, bottom + 20), f"cosine similarity  (y: {axis})", fill=(0, 0, 0))
    if log:
        for exponent in range(int(np.log10(LOG_FLOOR)), int(np.ceil(np.log10(peak))) + 1):
            y = y_of(10.0**exponent)
            if top <= y <= bottom:
                draw.line((left - 4, y, left, y), fill=(0, 0, 0))
                draw.text((8, y - 6), f"1e{exponent}", fill=(0, 0, 0))
    else:
        for frac in (0.0, 0.5, 1.0):
            y = y_of(frac * peak)
            draw.line((left - 4, y, left, y), fill=(0, 0, 0))
            draw.text((8, y - 6), f"{frac * peak:.3f}", fill=(0, 0, 0))
    if threshold is not None:
        x = x_of(threshold)
        draw.line((x, top, x, bottom), fill=THRESHOLD_COLOUR, width=2)
    return panel


def write_score_histograms(histogram: dict, threshold: float | None, path: str | Path, title: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    score_histograms(histogram, threshold, title).save(path)
    return path


# Distinct line colours (Tableau 10), reused in order.
LINE_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
LEGEND_W = 220


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str) -> Image.Image:
    """One line (with dots) per named series of (x, y) points, a legend on the right."""
    width, height = PLOT_W + LEGEND_W, PLOT_H + 2 * MARGIN_T
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(0, 0, 0))
    left, right, top, bottom = MARGIN_L, PLOT_W - MARGIN_R, MARGIN_T, height - MARGIN_B
    points = [p for pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = 0.0, max(max(ys), 1e-6) * 1.05

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    draw.line((left, bottom, right, bottom), fill=(0, 0, 0))
    draw.line((left, top, left, bottom), fill=(0, 0, 0))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        value = y_lo + frac * (y_hi - y_lo)
        _, y = at(x_lo, value)
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((8, y - 6), f"{value:.3f}", fill=(0, 0, 0))
    for x_value in sorted({p[0] for p in points}):
        x, _ = at(x_value, y_lo)
        draw.line((x, bottom, x, bottom + 4), fill=(0, 0, 0))
        draw.text((x - 4, bottom + 6), f"{x_value:g}", fill=(0, 0, 0))
    draw.text((right - 120, bottom + 20), f"x: {x_label}   y: {y_label}", fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        colour = LINE_COLOURS[i % len(LINE_COLOURS)]
        xy = [at(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        ly = top + 16 * i
        draw.line((PLOT_W + 4, ly + 6, PLOT_W + 24, ly + 6), fill=colour, width=3)
        draw.text((PLOT_W + 30, ly), name, fill=(0, 0, 0))
    return canvas


def write_line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str, x_label: str, y_label: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line_plot(series, title, x_label, y_label).save(path)
    return path
