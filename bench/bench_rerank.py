"""Query-time k-reciprocal re-ranking: the mAP it buys and the latency it adds.

    python bench/bench_rerank.py --checkpoint D/model.safetensors --data D/data
    python bench/bench_rerank.py ... --shortlists 20,50,100,200 --latency-sizes 10000,100000

Accuracy: every query of the Market-1501-layout folder is ranked against its gallery by
cosine (the service's exact search); the best N entries are re-ranked as the service does
(service.gallery.Gallery.search -> service.rerank.rerank_order, k1=20, k2=6, lambda=0.3),
the rest keep their order behind them; rank-1 / mAP under the Market-1501 rule. N = the
whole gallery is the paper's full re-ranking, for reference.

`--per-identity M` keeps only the first M gallery images of each person (distractors all
kept): k-reciprocal neighbourhoods need several entries per identity, which a gallery
enrolled by hand (one or two crops a person) may not have.

Latency: in-process, one query at a time, on a Gallery (SQLite store + flat FAISS index, one
FAISS thread as the service runs it) of random unit vectors of the checkpoint's dimension,
4 entries per identity: Gallery.search(k=10) without and with rerank_shortlist=N. The
re-ranking cost depends on N only; the shortlist search on the gallery size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench.bench_tracklets import cpu_model  # noqa: E402
from models import load_checkpoint  # noqa: E402
from service.gallery import Gallery  # noqa: E402
from service.index import IndexPlanSettings, SearchSettings  # noqa: E402
from service.rerank import rerank_order  # noqa: E402
from service.sqlite_store import SQLiteStore  # noqa: E402
from service.store import NewEntry  # noqa: E402
from training.data import load_reid_data  # noqa: E402
from training.embeddings import extract, query_gallery_labels  # noqa: E402
from training.evaluate import cmc_map  # noqa: E402


def reranked_distances(q: np.ndarray, g: np.ndarray, shortlist: int) -> tuple[np.ndarray, list[float]]:
    """Q x G distances whose order is the service's: the re-ranked shortlist first, then the rest by cosine."""
    sims = q @ g.T
    out = 10.0 + (1.0 - sims)  # behind every shortlisted entry, in cosine order
    times = []
    for i in range(len(q)):
        top = np.argsort(-sims[i], kind="stable")[:shortlist]
        started = time.perf_counter()
        order, _ = rerank_order(q[i], g[top])
        times.append(time.perf_counter() - started)
        out[i, top[order]] = np.arange(len(order)) / len(order)
    return out, times


def latency(dim: int, size: int, shortlists: list[int], queries: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(size, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "g.sqlite3")
        store.add_groups([(f"id{i // 4}", [NewEntry(v) for v in vectors[i:i + 4]]) for i in range(0, size, 4)], "bench")
        gallery = Gallery.open(store, fingerprint="bench", dim=dim, plan=IndexPlanSettings(setting="flat"),
                               search=SearchSettings(), snapshot_dir=Path(tmp) / "index")
        probes = vectors[rng.choice(size, queries, replace=False)] + 0.05 * rng.normal(size=(queries, dim)).astype(np.float32)
        result = {}
        for n in [None, *shortlists]:
            samples = []
            for p in probes:
                started = time.perf_counter()
                gallery.search(p, 10, rerank_shortlist=n)
                samples.append(time.perf_counter() - started)
            samples.sort()
            result["plain" if n is None else f"N={n}"] = (
                round(1000 * statistics.median(samples), 2), round(1000 * samples[int(0.95 * (len(samples) - 1))], 2)
            )
        store.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="Market-1501-layout folder (query/ and bounding_box_test/)")
    ap.add_argument("--shortlists", default="20,50,100,200")
    ap.add_argument("--latency-sizes", default="10000,100000")
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--per-identity", type=int, default=0, help="keep at most this many gallery images per person (0: all)")
    args = ap.parse_args()
    shortlists = [int(x) for x in args.shortlists.split(",")]
    faiss.omp_set_num_threads(1)  # as the service searches (REID_SEARCH_THREADS)

    model, info = load_checkpoint(args.checkpoint, "cpu")
    data = load_reid_data(args.data, with_train=False)
    if args.per_identity:
        seen: dict[int, int] = {}
        kept = []
        for s in data.gallery:
            seen[s.pid] = seen.get(s.pid, 0) + 1
            if s.pid == 0 or seen[s.pid] <= args.per_identity:
                kept.append(s)
        data.gallery = kept
    q = extract(model, data.query, info.mean, info.std, "cpu").numpy()
    g = extract(model, data.gallery, info.mean, info.std, "cpu").numpy()
    labels = query_gallery_labels(data)
    print(f"CPU: {cpu_model()}; {info.model_name}; {len(q)} queries x {len(g)} gallery", file=sys.stderr)

    def score(distmat) -> dict:
        r = cmc_map(distmat, *labels, max_rank=10)
        return {"rank1": round(float(r["cmc"][0]), 4), "mAP": round(r["mAP"], 4)}

    print(json.dumps({"shortlist": 0, **score(1.0 - q @ g.T)}), flush=True)
    for n in [*shortlists, len(g)]:
        distmat, times = reranked_distances(q, g, n)
        times.sort()
        row = {"shortlist": n, **score(distmat), "rerank_ms_p50": round(1000 * statistics.median(times), 2),
               "rerank_ms_p95": round(1000 * times[int(0.95 * (len(times) - 1))], 2)}
        print(json.dumps(row), flush=True)
    for size in [int(x) for x in args.latency_sizes.split(",") if x]:
        print(json.dumps({"gallery": size, "search_ms_p50_p95": latency(info.embedding_dim, size, shortlists, args.latency_queries)}), flush=True)


if __name__ == "__main__":
    main()
