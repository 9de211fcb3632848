"""Two matchers that learn nothing, to show how hard a dataset is: raw pixels and colour histograms.

    python -m training.baselines DATA_DIR      # prints one JSON line per matcher

A learned model should beat both clearly; if colour histograms already score high, the
dataset tells identities apart by colour alone and says little about a model.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image

from models.progress import progress as progress_bar
from training.data import DataLayoutError, load_reid_data, load_rgb
from training.evaluate import cmc_map

PIXEL_SIZE = (32, 16)  # (H, W) for the raw-pixel matcher
STRIPES = 6  # horizontal stripes for the histogram matcher
HSV_BINS = (8, 4, 4)  # hue, saturation, value bins per stripe (joint histogram)


def raw_pixel_features(image: Image.Image) -> np.ndarray:
    """The image shrunk to 32x16, flattened, centred and L2-normalised."""
    height, width = PIXEL_SIZE
    pixels = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.float64).ravel()
    pixels -= pixels.mean()
    return pixels / max(np.linalg.norm(pixels), 1e-12)


def colour_histogram_features(image: Image.Image) -> np.ndarray:
    """Joint HSV histograms of the central half, per horizontal stripe, square-rooted (Hellinger), L2-normalised."""
    width, height = image.size
    # The person is centred; the outer quarters are mostly background, which only says "which camera".
    centre = _grey_world(image.convert("RGB")).crop((width // 4, 0, width - width // 4, height))
    hsv = np.asarray(centre.convert("HSV"), dtype=np.int64)
    bins = np.array(HSV_BINS)
    quantised = hsv * bins // 256  # each channel to its bin index
    code = (quantised[..., 0] * bins[1] + quantised[..., 1]) * bins[2] + quantised[..., 2]
    size = int(np.prod(bins))
    stripes = np.array_split(code, STRIPES, axis=0)
    hist = np.concatenate([np.bincount(s.ravel(), minlength=size) / s.size for s in stripes])
    hist = np.sqrt(hist)
    return hist / max(np.linalg.norm(hist), 1e-12)


def _grey_world(image: Image.Image) -> Image.Image:
    """Scale each channel so that the image's mean is mid-grey: undoes a camera's colour cast and level."""
    pixels = np.asarray(image, dtype=np.float64)
    pixels *= 128.0 / np.maximum(pixels.reshape(-1, 3).mean(axis=0), 1.0)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


MATCHERS = {"raw_pixels": raw_pixel_features, "colour_histogram": colour_histogram_features}


def evaluate_baselines(data_dir: str, progress: bool = False) -> dict[str, dict]:
    """Every matcher's rank-1/5/10, mAP and mINP on the folder's query/gallery (cosine distance)."""
    data = load_reid_data(data_dir, with_train=False)
    samples = data.query + data.gallery
    images = [load_rgb(s.path) for s in progress_bar(samples, desc="reading", unit="img", enabled=progress)]
    q_pids, q_camids = np.array([s.pid for s in data.query]), np.array([s.camid for s in data.query])
    g_pids, g_camids = np.array([s.pid for s in data.gallery]), np.array([s.camid for s in data.gallery])
    results = {}
    for name, features in MATCHERS.items():
        vectors = np.stack([features(image) for image in images])
        query, gallery = vectors[: len(data.query)], vectors[len(data.query) :]
        scores = cmc_map(1.0 - query @ gallery.T, q_pids, g_pids, q_camids, g_camids)
        cmc = scores["cmc"]
        results[name] = {"rank1": float(cmc[0]), "rank5": float(cmc[4]), "rank10": float(cmc[9]),
                         "mAP": scores["mAP"], "mINP": scores["mINP"]}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="Market-1501-layout folder (query/ and bounding_box_test/ are used)")
    args = parser.parse_args(argv)
    try:
        results = evaluate_baselines(args.data_dir, progress=True)
    except (DataLayoutError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, scores in results.items():
        print(json.dumps({"matcher": name, **{k: round(v, 4) for k, v in scores.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
