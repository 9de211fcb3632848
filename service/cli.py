"""The command line: serve (default), import DIR, reembed. Errors: one line on stderr, exit 1."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import deque
from concurrent.futures import Future
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from models import CheckpointError
from models.progress import progress
from service.embedder import StartupError
from service.logging_setup import setup_logging
from service.settings import Settings
from service.store import StoreError

log = logging.getLogger("service")


class CliError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's parser.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--checkpoint", type=Path, help="serving checkpoint (env REID_CHECKPOINT)")
    common.add_argument("--data-dir", type=Path, help="gallery store and caches (env REID_DATA_DIR, default ./data)")
    common.add_argument("--database-url", help="postgresql://user@host:port/db: the gallery in PostgreSQL, shared by"
                        " replicas (env REID_DATABASE_URL; default: SQLite under the data dir)")
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], help="env REID_DEVICE (default auto)")
    common.add_argument("--backend", choices=["auto", "torch", "onnx", "openvino"], help="env REID_BACKEND (default auto)")
    common.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], help="env REID_PRECISION (default auto)")
    common.add_argument("--log-level", help="env REID_LOG_LEVEL (default info)")
    common.add_argument("--log-format", choices=["text", "json"], help="env REID_LOG_FORMAT (default text)")

    parser = argparse.ArgumentParser(
        prog="python -m service", parents=[common], argument_default=argparse.SUPPRESS,
        description="Person re-identification service. Every option can also be set as a REID_* environment variable.",
    )
    parser.add_argument("--host", help="env REID_HOST (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="env REID_PORT (default 8000)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", parents=[common], help="run the HTTP service (the default)")
    imp = sub.add_parser("import", parents=[common], help="enrol a Market-1501-style folder of crops")
    imp.add_argument("folder", type=Path, help="images named PPPP_cC...: identity PPPP, camera C")
    imp.add_argument("--if-empty", action="store_true", default=False, help="do nothing when the gallery already has entries")
    imp.add_argument("--max-identities", type=int, default=None, help="enrol only the first N identities")
    vec = sub.add_parser(
        "import-vectors", parents=[common],
        help="enrol precomputed embeddings: a .npz with identity (N strings), vector (N x D), optional camera (N ints, -1 none)",
    )
    vec.add_argument("file", type=Path, help=".npz file made with the serving checkpoint's model")
    vec.add_argument("--chunk-size", type=int, default=10_000, help="rows per transaction (default 10000)")
    sub.add_parser("reembed", parents=[common], help="re-embed stored crops made under another model")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    names = ("checkpoint", "data_dir", "database_url", "device", "backend", "precision", "log_level", "log_format", "host", "port")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        raise CliError(f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def serve(settings: Settings) -> None:
    import uvicorn

    import torch

    from models import load_checkpoint
    from models.hardware import cpu_info
    from service.backend_choice import candidates
    from service.embedder import resolve_device

    if settings.checkpoint is None:
        raise CliError("no checkpoint given: pass --checkpoint FILE or set REID_CHECKPOINT")
    # Fail fast, before binding the port: the app loads the model again in the background.
    load_checkpoint(settings.checkpoint)
    device = resolve_device(settings.device, torch.cuda.is_available())
    candidates(settings.backend, settings.precision, device, cpu_info(),
               cuda_bf16=device == "cuda" and torch.cuda.is_bf16_supported())
    from service.app import create_app
    from service.drain import DrainingServer

    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        log_config=None, access_log=False,  # our handler formats uvicorn's records; service.access logs requests
        # After the drain (drain.py) nothing should be in flight: this only bounds a stuck request.
        timeout_graceful_shutdown=1,
    )
    DrainingServer(config, app.state.lifecycle, settings.shutdown_delay_s, settings.shutdown_grace_s).run()


# -- import -------------------------------------------------------------------------------


def _market_files(folder: Path) -> tuple[dict[str, list[tuple[Path, int]]], int]:
    """identity -> [(path, camera)], and how many files were skipped (junk, distractors, other names)."""
    from models.market1501 import IMAGE_SUFFIXES, is_identity, parse_name

    if not folder.is_dir():
        raise CliError(f"{folder}: no such folder")
    groups: dict[str, list[tuple[Path, int]]] = {}
    skipped = 0
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        parsed = parse_name(path.name)
        if parsed is None or not is_identity(parsed[0]):
            skipped += 1
            continue
        identity = path.name.split("_", 1)[0]  # as written: "0002" stays "0002"
        groups.setdefault(identity, []).append((path, parsed[1]))
    return groups, skipped


def import_folder(settings: Settings, folder: Path, if_empty: bool, max_identities: int | None) -> None:
    from service.batcher import Batcher
    from service.errors import ClientError
    from service.imaging import prepare_image
    from service.services import load_model, open_store
    from service.store import NewEntry

    groups, skipped = _market_files(folder)
    if not groups:
        raise CliError(f"{folder}: no images named like Market-1501 crops (PPPP_cC...jpg) with a person id > 0")
    store = open_store(settings)
    try:
        if if_empty and (n := sum(store.counts_by_fingerprint().values())):
            print(f"gallery already has {n} entries: nothing imported (--if-empty)")
            return
        identities = sorted(groups)[:max_identities] if max_identities else sorted(groups)
        embedder = load_model(settings)
        info = embedder.info
        batcher = Batcher(embedder.embed, max_batch_size=settings.max_batch_size, max_wait_s=0.005,
                          workers=embedder.workers)
        pending: deque[tuple[str, list[int], list[bytes | None], list[Future]]] = deque()
        enrolled = bad = 0

        def commit_oldest() -> None:
            nonlocal enrolled
            identity, cameras, crops, futures = pending.popleft()
            entries = [NewEntry(f.result(), camera, crop) for f, camera, crop in zip(futures, cameras, crops)]
            store.add_entries(identity, entries, info.fingerprint)  # one transaction per identity
            enrolled += len(entries)

        try:
            for identity in progress(identities, desc="importing", unit="identity"):
                cameras, crops, futures = [], [], []
                for path, camera in groups[identity]:
                    try:
                        prepared = prepare_image(
                            path.read_bytes(), filename=str(path), input_size=info.input_size,
                            max_pixels=settings.max_image_pixels, keep_crop=settings.store_crops,
                        )
                    except (ClientError, OSError) as e:
                        tqdm.write(f"skipped {path}: {getattr(e, 'detail', e)}")
                        bad += 1
                        continue
                    futures.append(batcher.submit(prepared.pixels))  # decoding the next ones overlaps the model
                    cameras.append(camera)
                    crops.append(prepared.crop_jpeg)
                if futures:
                    pending.append((identity, cameras, crops, futures))
                while len(pending) > 2:
                    commit_oldest()
            while pending:
                commit_oldest()
        finally:
            batcher.close()
        print(
            f"imported {enrolled} entries for {len(identities)} identities from {folder}"
            f" ({skipped} files skipped by name, {bad} unreadable); a running service picks them up by itself"
        )
    finally:
        store.close()


# -- import-vectors -----------------------------------------------------------------------


def import_vector_file(settings: Settings, path: Path, chunk_rows: int) -> None:
    from models.checkpoint import read_checkpoint_info
    from service.services import open_store
    from service.vector_import import VectorFileError, import_vectors, read_vector_file

    if settings.checkpoint is None:
        raise CliError("no checkpoint given: pass --checkpoint FILE or set REID_CHECKPOINT (the model that made the vectors)")
    if chunk_rows < 1:
        raise CliError("--chunk-size must be at least 1")
    info = read_checkpoint_info(settings.checkpoint)
    try:
        data = read_vector_file(path, info.embedding_dim)
    except VectorFileError as e:
        raise CliError(str(e)) from None
    store = open_store(settings)
    try:
        with progress(total=len(data.identities), desc="importing vectors", unit="vector") as bar:
            bar.update(store.import_progress(f"vectors:{data.digest}:{info.fingerprint}"))
            before, written = import_vectors(store, data, info.fingerprint, chunk_rows, on_chunk=bar.update)
    finally:
        store.close()
    resumed = f" ({before} were already in from an earlier run)" if before else ""
    print(
        f"imported {written} vectors for {len(set(data.identities))} identities from {path} under model"
        f" {info.model_name}{resumed}; a running service picks them up by itself"
    )


# -- reembed ------------------------------------------------------------------------------


def reembed(settings: Settings) -> int:
    import numpy as np

    from service.errors import ClientError
    from service.imaging import prepare_image
    from service.services import load_model, open_store
    from service.store import stale_count

    store = open_store(settings)
    try:
        # One batch at a time here: all cores on the one pass unless the operator said otherwise.
        embedder = load_model(settings.model_copy(update={"model_workers": settings.model_workers or 1}))
        info = embedder.info
        stale = stale_count(store.counts_by_fingerprint(), info.fingerprint)
        if not stale:
            print(f"all entries already use model {info.model_name}: nothing to re-embed")
            return 0
        done, impossible, after = 0, [], 0
        with progress(total=stale, desc="re-embedding", unit="entry") as bar:
            while rows := store.stale_entries(info.fingerprint, after_id=after, batch=settings.max_batch_size):
                after = rows[-1][0]
                ids, pixels = [], []
                for entry_id, crop in rows:
                    try:
                        if crop is None:
                            raise ClientError(422, "no_crop", "no stored crop")
                        pixels.append(prepare_image(crop, filename=f"entry {entry_id}", input_size=info.input_size,
                                                    max_pixels=settings.max_image_pixels).pixels)
                        ids.append(entry_id)
                    except ClientError:
                        impossible.append(entry_id)
                if pixels:
                    store.update_vectors(list(zip(ids, embedder.embed(np.stack(pixels)))), info.fingerprint)
                    done += len(ids)
                bar.update(len(rows))
        print(f"re-embedded {done} entries with model {info.model_name}; a running service picks them up by itself")
        if impossible:
            shown = ", ".join(map(str, impossible[:10])) + (" ..." if len(impossible) > 10 else "")
            print(
                f"{len(impossible)} entries have no usable stored crop and cannot be re-embedded"
                f" (entry ids {shown}); delete and re-enrol their identities",
                file=sys.stderr,
            )
            return 2
        return 0
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        setup_logging(settings.log_level, settings.log_format)
        command = getattr(args, "command", None)
        if command == "import":
            import_folder(settings, args.folder, args.if_empty, args.max_identities)
        elif command == "import-vectors":
            import_vector_file(settings, args.file, args.chunk_size)
        elif command == "reembed":
            return reembed(settings)
        else:
            serve(settings)
    except (CliError, CheckpointError, StartupError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
