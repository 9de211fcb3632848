"""Bulk import of precomputed embeddings (``python -m service import-vectors FILE.npz``).

The file is read and checked whole before anything is written: a problem anywhere names
itself in one line (``VectorFileError``) and the store is untouched. Then the rows go in
chunks, one transaction each, recording in the same transaction how many rows of this
file (by content digest and model) are in: an interrupted import leaves whole chunks only,
and running it again carries on after the last committed chunk.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import ClientError
from service.schemas import validate_identity
from service.store import GalleryStore, NewEntry

REQUIRED = ("identity", "vector")
NO_CAMERA = -1
ZERO_NORM = 1e-12
CHECK_ROWS = 65_536


class VectorFileError(ValueError):
    """The file cannot be imported; the message names the file and the problem."""


@dataclass(frozen=True)
class VectorFile:
    identities: list[str]
    vectors: np.ndarray  # N x D float32, L2-normalised
    cameras: list[int | None]
    digest: str  # sha256 of the file's bytes


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise VectorFileError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [name for name in REQUIRED if name not in z.files]
            if missing:
                raise VectorFileError(f"{path}: missing array(s) {', '.join(missing)}; it has {', '.join(z.files) or 'none'}")
            return {name: z[name] for name in (*REQUIRED, "camera") if name in z.files}
    except VectorFileError:
        raise
    except ValueError as e:  # numpy refuses pickled object arrays with allow_pickle=False
        raise VectorFileError(f"{path}: arrays must be plain numbers and strings, not pickled objects ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise VectorFileError(f"{path}: not a readable .npz file ({e})") from None


def check_vectors(vectors: np.ndarray, dim: int, path: Path) -> np.ndarray:
    """N x dim finite, non-zero vectors -> float32, L2-normalised."""
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise VectorFileError(f"{path}: vector has shape {vectors.shape}; the model's embeddings are N x {dim}")
    if not np.issubdtype(vectors.dtype, np.floating):
        raise VectorFileError(f"{path}: vector is {vectors.dtype}, not floating point")
    vectors = vectors.astype(np.float32, copy=False)
    if not vectors.flags.writeable:  # normalised in place: a million 1024-d vectors are 4 GB
        vectors = vectors.copy()
    for start in range(0, len(vectors), CHECK_ROWS):  # in slices: no N x D temporaries
        rows = vectors[start:start + CHECK_ROWS]
        if not (finite := np.isfinite(rows).all(axis=1)).all():
            bad = start + np.flatnonzero(~finite)
            raise VectorFileError(f"{path}: vectors hold NaN or infinity (first at row {bad[0]})")
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        if (zero := norms <= ZERO_NORM).any():
            bad = start + np.flatnonzero(zero)
            raise VectorFileError(f"{path}: vectors are zero (first at row {bad[0]}); they have no direction")
        rows /= norms[:, None]
    return vectors


def check_identities(raw: np.ndarray, n: int, path: Path) -> list[str]:
    if raw.ndim != 1 or len(raw) != n:
        raise VectorFileError(f"{path}: identity has shape {raw.shape}; it needs one string per vector ({n})")
    if raw.dtype.kind not in "US":
        raise VectorFileError(f"{path}: identity is {raw.dtype}, not strings")
    names = raw.astype(str).tolist()
    for row, name in enumerate(names):
        try:
            names[row] = validate_identity(name)
        except ClientError as e:
            raise VectorFileError(f"{path}: identity at row {row}: {e.detail}") from None
    return names


def check_cameras(raw: np.ndarray | None, n: int, path: Path) -> list[int | None]:
    if raw is None:
        return [None] * n
    if raw.ndim != 1 or len(raw) != n:
        raise VectorFileError(f"{path}: camera has shape {raw.shape}; it needs one integer per vector ({n})")
    if raw.dtype.kind not in "iu":
        raise VectorFileError(f"{path}: camera is {raw.dtype}, not integers (-1 for none)")
    if (raw < NO_CAMERA).any():
        row = int(np.flatnonzero(raw < NO_CAMERA)[0])
        raise VectorFileError(f"{path}: camera at row {row} is {raw[row]}; cameras are >= 0, or -1 for none")
    return [None if c == NO_CAMERA else int(c) for c in raw.tolist()]


def read_vector_file(path: Path, dim: int) -> VectorFile:
    """Everything checked, nothing written: VectorFileError names the first problem."""
    arrays = _arrays(path)
    vectors = arrays["vector"]
    n = len(vectors) if vectors.ndim >= 1 else 0
    if n == 0:
        raise VectorFileError(f"{path}: vector holds no rows")
    return VectorFile(
        identities=check_identities(arrays["identity"], n, path),
        vectors=check_vectors(vectors, dim, path),
        cameras=check_cameras(arrays.get("camera"), n, path),
        digest=file_digest(path),
    )


def chunk_groups(
    identities: list[str], vectors: np.ndarray, cameras: list[int | None], start: int, stop: int
) -> list[tuple[str, list[NewEntry]]]:
    """Rows [start, stop) as (identity, entries) groups of consecutive rows."""
    groups: list[tuple[str, list[NewEntry]]] = []
    for row in range(start, stop):
        entry = NewEntry(vectors[row], cameras[row])
        if groups and groups[-1][0] == identities[row]:
            groups[-1][1].append(entry)
        else:
            groups.append((identities[row], [entry]))
    return groups


def import_vectors(
    store: GalleryStore, data: VectorFile, fingerprint: str, chunk_rows: int,
    on_chunk: Callable[[int], None] = lambda rows: None,
) -> tuple[int, int]:
    """Write the rows not yet imported; (rows already there before, rows written now)."""
    key = f"vectors:{data.digest}:{fingerprint}"
    done = before = store.import_progress(key)
    total = len(data.identities)
    while done < total:
        stop = min(done + chunk_rows, total)
        groups = chunk_groups(data.identities, data.vectors, data.cameras, done, stop)
        store.add_groups(groups, fingerprint, progress=(key, stop))
        on_chunk(stop - done)
        done = stop
    return before, total - before
