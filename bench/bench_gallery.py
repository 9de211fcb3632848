"""Gallery index benchmark: FAISS index kinds on ReID-like embeddings, through the service's classes.

Not a test: run by hand, results go into docs/gallery.md.

    python bench/bench_gallery.py --checkpoint CKPT --data SYNTH --work DIR \\
        --sizes 10000,100000,1000000 --kinds flat,hnsw32,ivf4096 [--startup]

Data: the checkpoint embeds every crop of a synthetic Market-1501-layout folder (cached in
DIR). Those embeddings are "multiplied out" to N gallery entries: pseudo-identity j copies
a real identity b's crops, shifted by an offset shared by j's entries (so that pseudo-
identities of one real person are told apart about as well as two real people are) plus a
small per-entry perturbation; 10 entries per pseudo-identity. Queries: held-out crops of
enrolled real identities shifted by the pseudo-identity's offset (known people), and crops
of real identities never enrolled, with fresh offsets (unknown people).

Per index kind and size: build time, snapshot save/load, query p50/p99 (one query at a
time, by=identity, k=10, through VectorIndex.search as the service calls it), recall@10 vs
exact (identities), and the index's resident memory (anonymous RSS growth).
``--startup`` also measures the service's own start-up at the largest size: import-vectors
into a SQLite store, Gallery.open building the index, a snapshot, and Gallery.open again
from the snapshot.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.index import IndexSpec, SearchSettings, VectorIndex  # noqa: E402

PER_IDENTITY = 10
K = 10

# name -> (spec, search settings to try)
KINDS = {
    "flat": (IndexSpec("flat", "Flat"), [SearchSettings()]),
    "hnsw32": (IndexSpec("hnsw", "HNSW32,Flat", 80), [SearchSettings(hnsw_ef_search=e) for e in (128, 256)]),
    "hnsw32-efc200": (IndexSpec("hnsw", "HNSW32,Flat", 200), [SearchSettings(hnsw_ef_search=e) for e in (128, 256)]),
    "hnsw32-sq8": (IndexSpec("hnsw", "HNSW32,SQ8", 80), [SearchSettings(hnsw_ef_search=e) for e in (128, 256)]),
}
for lists in (1024, 2048, 4096, 8192):
    KINDS[f"ivf{lists}"] = (IndexSpec("ivf", f"IVF{lists},Flat"), [SearchSettings(ivf_nprobe=p) for p in (16, 32, 64, 128)])
    KINDS[f"ivf{lists}-sq8"] = (IndexSpec("ivf", f"IVF{lists},SQ8"), [SearchSettings(ivf_nprobe=p) for p in (16, 32, 64)])


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# -- data ---------------------------------------------------------------------------------


def embed_folder(checkpoint: Path, folder: Path, cache: Path) -> dict:
    """Embeddings of every crop in a Market-1501-layout folder (cached): vectors, pids, cams, part."""
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    from models.market1501 import IMAGE_SUFFIXES, parse_name
    from service.embedder import load_embedder
    from service.imaging import prepare_image

    embedder = load_embedder(checkpoint, device="cpu", backend="onnx", data_dir=cache.parent)
    info = embedder.info
    vectors, pids, cams, parts = [], [], [], []
    for part_id, part in enumerate(("bounding_box_train", "bounding_box_test", "query")):
        files = [p for p in sorted((folder / part).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        for start in range(0, len(files), 64):
            chunk = files[start:start + 64]
            pixels = [prepare_image(p.read_bytes(), filename=p.name, input_size=info.input_size, max_pixels=10**8).pixels
                      for p in chunk]
            vectors.append(embedder.embed(np.stack(pixels)))
            for p in chunk:
                pid, cam = parse_name(p.name)
                pids.append(pid), cams.append(cam), parts.append(part_id)
        print(f"embedded {part}: {len(files)} crops", file=sys.stderr)
    out = {"vectors": np.concatenate(vectors).astype(np.float32), "pids": np.array(pids), "cams": np.array(cams),
           "parts": np.array(parts)}
    np.savez(cache, **out)
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class ReIDLike:
    """Pseudo-identities made from real embeddings; see the module docstring."""

    def __init__(self, base: dict, seed: int = 0, unknown_share: float = 0.2, entry_noise: float = 0.05):
        rng = np.random.default_rng(seed)
        keep = base["pids"] > 0  # people only: no junk, no distractors
        vectors, pids = base["vectors"][keep], base["pids"][keep]
        self.dim = vectors.shape[1]
        people = np.unique(pids)
        rng.shuffle(people)
        n_unknown = int(len(people) * unknown_share)
        self.unknown_people, self.known_people = people[:n_unknown], people[n_unknown:]
        self.crops = {int(p): vectors[pids == p] for p in people}
        # Held out for queries: the last crop of every known person; the rest make entries.
        self.gallery_crops = {p: c[:-1] if len(c) > 1 else c for p, c in self.crops.items()}
        self.query_crops = {p: c[-1:] for p, c in self.crops.items()}
        centroids = _normalise(np.stack([c.mean(axis=0) for c in self.crops.values()]))
        sims = centroids @ centroids.T
        np.fill_diagonal(sims, -1)
        # Offsets as far apart as the nearest two real people: sqrt(2) * sigma ~ that distance.
        nearest = np.sqrt(np.maximum(2 - 2 * sims.max(axis=1), 0))
        self.identity_offset = float(np.median(nearest) / np.sqrt(2))
        self.entry_noise = entry_noise
        self.seed = seed

    def _offsets(self, rng, n: int) -> np.ndarray:
        return rng.normal(size=(n, self.dim)).astype(np.float32) * (self.identity_offset / np.sqrt(self.dim))

    def _noise(self, rng, n: int) -> np.ndarray:
        return rng.normal(size=(n, self.dim)).astype(np.float32) * (self.entry_noise / np.sqrt(self.dim))

    def gallery(self, n_entries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N x D unit vectors, pseudo-identity per entry, base person per pseudo-identity)."""
        rng = np.random.default_rng(self.seed + 1)
        n_ids = int(np.ceil(n_entries / PER_IDENTITY))
        base_of = rng.choice(self.known_people, size=n_ids)
        offsets = self._offsets(rng, n_ids)
        vectors = np.empty((n_entries, self.dim), np.float32)
        ids = np.repeat(np.arange(n_ids), PER_IDENTITY)[:n_entries]
        for start in range(0, n_ids, 10_000):
            stop = min(start + 10_000, n_ids)
            rows = slice(start * PER_IDENTITY, min(stop * PER_IDENTITY, n_entries))
            picked = np.concatenate([
                self.gallery_crops[int(b)][rng.integers(0, len(self.gallery_crops[int(b)]), PER_IDENTITY)]
                for b in base_of[start:stop]
            ])[: rows.stop - rows.start]
            shift = np.repeat(offsets[start:stop], PER_IDENTITY, axis=0)[: rows.stop - rows.start]
            vectors[rows] = _normalise(picked + shift + self._noise(rng, len(picked)))
        self._offsets_of, self._base_of = offsets, base_of
        return vectors, ids, base_of

    def queries(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(known-people queries, unknown-people queries), n each; call after gallery()."""
        rng = np.random.default_rng(self.seed + 2)
        which = rng.integers(0, len(self._base_of), n)
        held = np.stack([self.query_crops[int(self._base_of[j])][0] for j in which])
        known = _normalise(held + self._offsets_of[which] + self._noise(rng, n))
        people = rng.choice(self.unknown_people, size=n)
        crops = np.stack([self.crops[int(p)][rng.integers(len(self.crops[int(p)]))] for p in people])
        unknown = _normalise(crops + self._offsets(rng, n) + self._noise(rng, n))
        return known, unknown


# -- measurements -------------------------------------------------------------------------


def build(spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray) -> tuple[VectorIndex, float]:
    """Built on every core, as the service does before it serves; searched on one thread."""
    import faiss
    import os

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    index = VectorIndex(vectors.shape[1], spec)
    if spec.needs_training():
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), spec.training_size()), replace=False)
        index.train(vectors[np.sort(sample)])
    names = [f"id{i}" for i in range(int(ids.max()) + 1)]
    for start in range(0, len(vectors), 50_000):
        stop = min(start + 50_000, len(vectors))
        index.upsert(np.arange(start, stop) + 1, ids[start:stop], [names[i] for i in ids[start:stop]],
                     [None] * (stop - start), vectors[start:stop])
    elapsed = time.perf_counter() - started
    faiss.omp_set_num_threads(1)
    return index, elapsed


def search_all(index: VectorIndex, queries: np.ndarray) -> tuple[list[set], np.ndarray]:
    results, times = [], np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        matches = index.search(q, K, by="identity")
        times[i] = time.perf_counter() - t0
        results.append({m.identity for m in matches})
    return results, times


def recall(found: list[set], exact: list[set]) -> float:
    return float(np.mean([len(f & e) / max(len(e), 1) for f, e in zip(found, exact)]))


def snapshot_times(index: VectorIndex) -> tuple[float, float, int]:
    from service.index import IndexPlanSettings
    from service.snapshot import SnapshotKey, load_snapshot, save_snapshot

    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        key = SnapshotKey("bench", "bench", index.dim, IndexPlanSettings())
        t0 = time.perf_counter()
        save_snapshot(Path(tmp), index, key, position=1)
        t1 = time.perf_counter()
        loaded, _ = load_snapshot(Path(tmp), key, head=1, search=index.search_settings)
        t2 = time.perf_counter()
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        del loaded
    return t1 - t0, t2 - t1, size


def prepare_size(data: ReIDLike, n: int, queries: int, work: Path) -> Path:
    """Gallery, queries and the exact answers for one size, as files the kind workers map."""
    folder = work / f"size-{n}"
    if (folder / "exact.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vectors, ids, _ = data.gallery(n)
    known, unknown = data.queries(queries)
    np.save(folder / "vectors.npy", vectors)
    np.save(folder / "ids.npy", ids)
    np.save(folder / "known.npy", known)
    np.save(folder / "unknown.npy", unknown)
    exact_index, _ = build(KINDS["flat"][0], vectors, ids)
    exact = {name: [sorted(s) for s in search_all(exact_index, q)[0]] for name, q in (("known", known), ("unknown", unknown))}
    (folder / "exact.json").write_text(json.dumps(exact))
    return folder


def measure_kind(folder: Path, name: str) -> list[dict]:
    """One index kind on one prepared size, in a process of its own (for a clean memory figure)."""
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")  # file pages: not anonymous memory
    ids = np.load(folder / "ids.npy")
    known, unknown = np.load(folder / "known.npy"), np.load(folder / "unknown.npy")
    exact = {k: [set(s) for s in v] for k, v in json.loads((folder / "exact.json").read_text()).items()}
    spec, grid = KINDS[name]
    gc.collect()
    before = rss_anon()
    index, build_s = build(spec, vectors, ids)
    memory = rss_anon() - before
    if spec.compressed:  # re-scored from the exact vectors (in the service: read from the store)
        index.exact_vectors = lambda entry_ids: np.asarray(vectors[entry_ids - 1])
    save_s, load_s, disk = snapshot_times(index)
    rows = []
    for settings in grid:
        index.search_settings = settings
        found_k, t_k = search_all(index, known)
        found_u, t_u = search_all(index, unknown)
        times = np.concatenate([t_k, t_u]) * 1000
        row = {
            "entries": len(vectors), "kind": name, "factory": spec.factory, "search": settings.__dict__,
            "build_s": round(build_s, 1), "snapshot_save_s": round(save_s, 2), "snapshot_load_s": round(load_s, 2),
            "snapshot_mb": round(disk / 2**20), "p50_ms": round(float(np.percentile(times, 50)), 2),
            "p99_ms": round(float(np.percentile(times, 99)), 2),
            "recall_known": round(recall(found_k, exact["known"]), 4),
            "recall_unknown": round(recall(found_u, exact["unknown"]), 4),
            "index_mb": round(memory / 2**20), "raw_mb": round(vectors.nbytes / 2**20),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def measure_size(data: ReIDLike, n: int, kinds: list[str], queries: int, work: Path) -> list[dict]:
    import subprocess

    folder = prepare_size(data, n, queries, work)
    rows = []
    for name in kinds:
        spec, _ = KINDS[name]
        if spec.kind == "ivf" and n < int(spec.factory.split(",")[0][3:]) * 39:
            continue  # too few entries to learn that many cells
        result = subprocess.run([sys.executable, __file__, "--worker", str(folder), name], capture_output=True, text=True)
        if result.returncode:
            print(f"{name} at {n}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            continue
        for line in result.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line, flush=True)
    return rows


def measure_startup(folder: Path, spec_setting: str, storage: str) -> dict:
    """The service's own path on a prepared size: import-vectors into SQLite, Gallery.open
    (building the index), a snapshot, Gallery.open again from the snapshot; and what reading
    a shortlist's exact vectors from the store costs (a compressed index's re-score)."""
    from service.gallery import Gallery
    from service.index import IndexPlanSettings, exact_max_entries
    from service.sqlite_store import SQLiteStore
    from service.vector_import import VectorFile, import_vectors

    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    ids = np.load(folder / "ids.npy")
    n, dim = vectors.shape
    store_dir = Path(tempfile.mkdtemp(dir=folder))
    store = SQLiteStore(store_dir / "gallery.sqlite3")
    t0 = time.perf_counter()
    import_vectors(store, VectorFile([f"id{i}" for i in ids], vectors, [None] * n, "bench"), "fp", 10_000)
    import_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    reads = []
    for _ in range(200):
        t0 = time.perf_counter()
        store.vectors(rng.integers(1, n + 1, 200))
        reads.append((time.perf_counter() - t0) * 1000)
    plan = IndexPlanSettings(setting=spec_setting, exact_max_entries=exact_max_entries(dim), storage=storage)
    open_args = dict(fingerprint="fp", dim=dim, plan=plan, search=SearchSettings(), snapshot_dir=store_dir / "index")
    import faiss
    import os

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # as the service builds at start
    t0 = time.perf_counter()
    gallery = Gallery.open(store, **open_args)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gallery.snapshot()
    snapshot_s = time.perf_counter() - t0
    kind = gallery._index.spec.factory
    store.close()
    del gallery
    import subprocess

    # Start-up from the snapshot in a fresh process, as after a restart: time and memory.
    reopen = subprocess.run([sys.executable, __file__, "--reopen", str(store_dir), spec_setting, storage, str(dim)],
                            capture_output=True, text=True, check=True)
    reopen_s, memory, entries = json.loads(reopen.stdout.splitlines()[-1])
    assert entries == n
    row = {"entries": n, "index": spec_setting, "storage": storage, "factory": kind,
           "import_vectors_s": round(import_s, 1), "open_build_s": round(build_s, 1), "snapshot_s": round(snapshot_s, 1),
           "open_from_snapshot_s": round(reopen_s, 1), "gallery_memory_mb": round(memory / 2**20),
           "raw_mb": round(vectors.nbytes / 2**20), "store_mb": round((store_dir / "gallery.sqlite3").stat().st_size / 2**20),
           "store_read_200_vectors_p50_ms": round(float(np.percentile(reads, 50)), 2),
           "store_read_200_vectors_p99_ms": round(float(np.percentile(reads, 99)), 2)}
    print(json.dumps(row), flush=True)
    return row


def reopen(store_dir: Path, spec_setting: str, storage: str, dim: int) -> None:
    """Print [seconds to open from the snapshot, anonymous memory it took, entries]."""
    from service.gallery import Gallery
    from service.index import IndexPlanSettings, exact_max_entries
    from service.sqlite_store import SQLiteStore

    plan = IndexPlanSettings(setting=spec_setting, exact_max_entries=exact_max_entries(dim), storage=storage)
    before = rss_anon()
    t0 = time.perf_counter()
    gallery = Gallery.open(SQLiteStore(store_dir / "gallery.sqlite3"), fingerprint="fp", dim=dim, plan=plan,
                           search=SearchSettings(), snapshot_dir=store_dir / "index")
    elapsed = time.perf_counter() - t0
    assert gallery.replayed_at_open == 0
    print(json.dumps([elapsed, rss_anon() - before, gallery.stats.entries]))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--reopen":
        reopen(Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        import faiss

        faiss.omp_set_num_threads(1)
        measure_kind(Path(sys.argv[2]), sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="synthetic Market-1501-layout folder to embed")
    p.add_argument("--work", type=Path, required=True, help="folder for the embedding cache and temporary stores")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--kinds", default="flat,hnsw32,ivf4096")
    p.add_argument("--queries", type=int, default=500, help="known and unknown queries each")
    p.add_argument("--startup", default="", help="index setting (e.g. auto) to measure start-up with, at the largest size")
    p.add_argument("--startup-storage", default="flat", choices=["flat", "sq8"])
    p.add_argument("--out", type=Path, help="append JSON lines here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    faiss.omp_set_num_threads(1)  # as the service searches
    args.work.mkdir(parents=True, exist_ok=True)
    base = embed_folder(args.checkpoint, args.data, args.work / "base-embeddings.npz")
    data = ReIDLike(base)
    print(json.dumps({"cpu": cpu_name(), "dim": data.dim, "real_people": len(data.crops),
                      "identity_offset": round(data.identity_offset, 4), "entry_noise": data.entry_noise}), flush=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        rows += measure_size(data, n, args.kinds.split(","), args.queries, args.work)
    if args.startup:
        largest = max(int(s) for s in args.sizes.split(","))
        rows.append(measure_startup(prepare_size(data, largest, args.queries, args.work), args.startup,
                                    args.startup_storage))
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
