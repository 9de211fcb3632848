"""Tracklet queries: rank-1 / mAP for tracklets of 1, 2, 4, 8 crops, and how to aggregate them.

    python -m training demo --out D
    python bench/bench_tracklets.py --checkpoint D/model.safetensors --data /tmp/tracklets
    # renders the set first when --data does not exist yet (--identities 300 --seed 0)

The default set has the demo's identities, split and cameras (same --identities and --seed as
`training demo`; the renderer draws people and cameras from the seed alone), only seen in 8
frames per camera visit: the test people are the demo's held-out ones, never trained on. With
another seed the cameras are new too, a domain shift the demo model handles badly.

A tracker follows one person through one camera: a tracklet here is L consecutive frames of
one person on one camera (the synthetic renderer gives each camera visit its own walking
phase, view and frames). The set is rendered with 8 frames per visit, so every visit yields
the same anchor for every L (its first L frames). Each tracklet is searched against every
test image (all cameras, distractors included) under the Market-1501 rule: entries of the
same person on the same camera (the tracklet's own frames among them) are removed.

Aggregations compared, all on L2-normalised embeddings:
  mean        mean of the embeddings, re-normalised: one search (what the service does)
  weighted    each crop weighted by its cosine to the plain mean, re-normalised: a quality
              proxy that needs no quality model (an occluded or mis-cropped frame agrees
              less with the rest)
  max-fusion  one search per crop; an entry scores its best cosine over the crops
(The mean of the per-crop scores ranks exactly like the mean embedding: the cosine is linear
in the query, so it is not listed.)

At the checkpoint's calibrated threshold (if any) it also reports, per L, the pair-level
accept rates of the aggregated query: TAR on same-person-other-camera pairs and FAR on
different-people pairs, to show whether the threshold fitted on single crops still holds.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from models import load_checkpoint  # noqa: E402
from service.tracklet import aggregate  # noqa: E402
from training.calibration import accept_rate, pair_scores  # noqa: E402
from training.data import GALLERY_DIR, QUERY_DIR, Sample, scan_folder  # noqa: E402
from training.embeddings import extract  # noqa: E402
from training.evaluate import cmc_map  # noqa: E402
from training.synth import generate_dataset  # noqa: E402

FRAMES_PER_VISIT = 8


def test_images(root: Path) -> list[Sample]:
    """query/ and bounding_box_test/ pooled, junk dropped, in file-name order (person, camera, frame)."""
    samples = [Sample(*e) for sub in (QUERY_DIR, GALLERY_DIR) for e in scan_folder(root / sub) if e[1] != -1]
    return sorted(samples, key=lambda s: Path(s.path).name)


def visits(samples: list[Sample], frames: int) -> list[list[int]]:
    """Indices of the first ``frames`` frames of every (person, camera) visit that has that many."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.pid > 0:
            groups[(s.pid, s.camid)].append(i)
    return [idx[:frames] for idx in groups.values() if len(idx) >= frames]


def weighted_mean(vectors: np.ndarray) -> np.ndarray:
    mean = aggregate(vectors)
    weights = np.clip(vectors @ mean, 0.0, None)
    out = (weights[:, None] * vectors).sum(axis=0)
    return out / np.linalg.norm(out)


def similarities(method: str, crops: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    if method == "mean":
        return gallery @ aggregate(crops)
    if method == "weighted":
        return gallery @ weighted_mean(crops)
    if method == "max-fusion":
        return (crops @ gallery.T).max(axis=0)
    raise ValueError(method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="synthetic set with 8 frames per camera visit (rendered if missing)")
    ap.add_argument("--identities", type=int, default=300, help="when rendering: persons (half are test identities)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="1,2,4,8")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    assert max(lengths) <= FRAMES_PER_VISIT

    root = Path(args.data)
    if not root.exists():
        print(f"rendering {args.identities} identities with {FRAMES_PER_VISIT} frames per visit into {root}", file=sys.stderr)
        generate_dataset(root, identities=args.identities, seed=args.seed,
                         images_per_camera=(FRAMES_PER_VISIT, FRAMES_PER_VISIT), progress=True)
    model, info = load_checkpoint(args.checkpoint, "cpu")
    samples = test_images(root)
    started = time.perf_counter()
    embeddings = extract(model, samples, info.mean, info.std, "cpu").numpy()
    embed_s = time.perf_counter() - started
    pids = np.array([s.pid for s in samples])
    cams = np.array([s.camid for s in samples])
    anchors = visits(samples, FRAMES_PER_VISIT)
    threshold = info.match_threshold
    print(f"{len(samples)} test images embedded in {embed_s:.0f} s; {len(anchors)} tracklets "
          f"({len(set(pids[a[0]] for a in anchors))} persons); threshold {threshold}", file=sys.stderr)

    rows = []
    for method in ("mean", "weighted", "max-fusion"):
        for length in lengths:
            sims = np.stack([similarities(method, embeddings[a[:length]], embeddings) for a in anchors])
            q_pids, q_cams = pids[[a[0] for a in anchors]], cams[[a[0] for a in anchors]]
            result = cmc_map(1.0 - sims, q_pids, pids, q_cams, cams, max_rank=10)
            row = {"method": method, "crops": length, "rank1": round(float(result["cmc"][0]), 4),
                   "mAP": round(result["mAP"], 4)}
            if threshold is not None and method == "mean":
                genuine, impostor = pair_scores(sims, q_pids, pids, q_cams, cams)
                row["tar_at_threshold"] = round(accept_rate(genuine, threshold), 4)
                row["far_at_threshold"] = float(f"{accept_rate(impostor, threshold):.2e}")
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nCPU: {cpu_model()}; checkpoint {info.model_name}; data {root} ({len(anchors)} tracklets)")
    print("| crops | " + " | ".join(f"{m} rank-1 / mAP" for m in ("mean", "weighted", "max-fusion")) + " |")
    print("|---|---|---|---|")
    for length in lengths:
        cells = [next(r for r in rows if r["method"] == m and r["crops"] == length) for m in ("mean", "weighted", "max-fusion")]
        print(f"| {length} | " + " | ".join(f"{c['rank1']:.3f} / {c['mAP']:.3f}" for c in cells) + " |")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
