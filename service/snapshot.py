"""Index snapshots under ``DATA_DIR/index/``: an index saved with the log position it covers.

A snapshot is two data files (the FAISS index, the slot labels) and ``manifest.json``, which
names them with their sizes and SHA-256 digests and records what they cover: the store
they came from, the log position, the model fingerprint, the vector dimension and the
index spec. The data files get fresh names every time and the manifest is replaced
atomically last, so a crash mid-snapshot leaves the previous snapshot whole. Loading
checks everything the manifest says before the index is used; any mismatch raises
``SnapshotRejected`` with the reason, and the caller rebuilds from the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from service.index import IndexPlanSettings, IndexSpec, SearchSettings, VectorIndex

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNK = 16 << 20


class SnapshotRejected(Exception):
    """The snapshot cannot be used; the message says why (missing, damaged, foreign, stale ...)."""


@dataclass(frozen=True)
class SnapshotKey:
    """What a snapshot must match to be used. The plan, not the index spec: a gallery that grew
    since the snapshot may call for another spec, which the follower builds in the background
    while the snapshot serves."""

    store_id: str
    fingerprint: str
    dim: int
    plan: IndexPlanSettings


@dataclass(frozen=True)
class Manifest:
    format_version: int
    store_id: str
    fingerprint: str
    dim: int
    plan: dict
    spec: dict
    built_for: int
    position: int
    entries: int
    files: dict  # role -> {"name", "bytes", "sha256"}
    created: float

    @property
    def index_spec(self) -> IndexSpec:
        return IndexSpec(**self.spec)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise SnapshotRejected("no snapshot")
    try:
        manifest = Manifest(**json.loads(path.read_text()))
        manifest.index_spec  # noqa: B018 -- a spec that does not parse is an unreadable manifest
    except (ValueError, TypeError) as e:
        raise SnapshotRejected(f"unreadable manifest ({e})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise SnapshotRejected(f"format version {manifest.format_version}, this software writes {FORMAT_VERSION}")
    return manifest


def check_manifest(manifest: Manifest, key: SnapshotKey, head: int) -> None:
    """Reject a snapshot of another store, model or index spec, or one ahead of the log."""
    if manifest.store_id != key.store_id:
        raise SnapshotRejected("it belongs to another gallery store")
    if manifest.fingerprint != key.fingerprint:
        raise SnapshotRejected(f"it was made for model {manifest.fingerprint[:12]}, not {key.fingerprint[:12]}")
    if manifest.dim != key.dim:
        raise SnapshotRejected(f"it holds {manifest.dim}-d vectors, the model makes {key.dim}-d")
    if manifest.plan != asdict(key.plan):
        raise SnapshotRejected(f"it was made under other index settings ({manifest.plan})")
    if manifest.position > head:
        raise SnapshotRejected(f"it covers log position {manifest.position}, past the store's last ({head})")


def load_snapshot(folder: Path, key: SnapshotKey, head: int, search: SearchSettings) -> tuple[VectorIndex, int]:
    """(the index, the log position it covers), or SnapshotRejected."""
    manifest = read_manifest(folder)
    check_manifest(manifest, key, head)
    paths = {}
    for role in ("faiss", "labels"):
        meta = manifest.files.get(role) or {}
        path = folder / str(meta.get("name", ""))
        if not meta or not path.is_file():
            raise SnapshotRejected(f"its {role} file is missing")
        if path.stat().st_size != meta["bytes"] or _digest(path) != meta["sha256"]:
            raise SnapshotRejected(f"its {role} file is damaged (size or checksum differs)")
        paths[role] = path
    try:
        index = VectorIndex.load(key.dim, manifest.index_spec, search, paths["faiss"], paths["labels"])
    except Exception as e:  # FAISS and numpy raise many kinds; a checksummed file should not
        raise SnapshotRejected(f"its files do not load ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if len(index) != manifest.entries:
        raise SnapshotRejected(f"it holds {len(index)} entries, its manifest says {manifest.entries}")
    index.built_for = manifest.built_for
    return index, manifest.position


def save_snapshot(folder: Path, index: VectorIndex, key: SnapshotKey, position: int) -> Manifest:
    """Write the data files under new names, then replace the manifest atomically, then drop
    the files no manifest names. The caller guarantees ``index`` covers exactly ``position``."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"snapshot-{position}-{secrets.token_hex(4)}"
    paths = {"faiss": folder / f"{stem}.faiss", "labels": folder / f"{stem}.labels.npz"}
    entries = len(index)
    index.save(paths["faiss"], paths["labels"])
    files = {}
    for role, path in paths.items():
        _fsync(path)
        files[role] = {"name": path.name, "bytes": path.stat().st_size, "sha256": _digest(path)}
    manifest = Manifest(
        format_version=FORMAT_VERSION, store_id=key.store_id, fingerprint=key.fingerprint, dim=key.dim,
        plan=asdict(key.plan), spec=asdict(index.spec), built_for=index.built_for,
        position=position, entries=entries, files=files, created=time.time(),
    )
    tmp = folder / f"{MANIFEST}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(json.dumps(asdict(manifest), indent=1))
    _fsync(tmp)
    os.replace(tmp, folder / MANIFEST)
    _fsync(folder)
    keep = {MANIFEST, *(f["name"] for f in files.values())}
    for path in folder.iterdir():
        if path.name not in keep and (path.name.startswith("snapshot-") or path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)
    return manifest
