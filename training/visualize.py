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
