"""Uploads -> embeddings: read (bounded), admit under the queue bound, decode and resize (small
crops on the event loop, big images on a worker thread), batch-embed within the deadline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from service.admission import WaitBudget
from service.errors import ClientError
from service.imaging import header_pixels, prepare_image
from service.services import Services

CHUNK = 64 * 1024


@dataclass
class Upload:
    filename: str
    data: bytes


async def read_uploads(files: list[UploadFile], max_bytes: int, max_images: int) -> list[Upload]:
    """Read the files chunk by chunk, refusing (413) as soon as they pass max_bytes together."""
    if not files:
        raise ClientError(422, "no_image", "no 'image' file in the request")
    if len(files) > max_images:
        raise ClientError(413, "too_many_images", f"{len(files)} images in one request; at most {max_images}")
    uploads, total = [], 0
    for i, f in enumerate(files):
        name = f.filename or f"image {i + 1}"
        chunks = []
        while chunk := await f.read(CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise ClientError(413, "too_large", f"upload exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
        uploads.append(Upload(name, b"".join(chunks)))
    return uploads


def _prepare(services: Services, uploads: list[Upload], keep_crops: bool) -> tuple[list[np.ndarray], list[bytes | None]]:
    """Decode and resize every upload: H x W x 3 uint8 each, and the crops to store."""
    info, settings, stage = services.embedder.info, services.settings, services.metrics.stage_duration
    arrays, crops = [], []
    for upload in uploads:
        prepared = prepare_image(
            upload.data, filename=upload.filename, input_size=info.input_size,
            max_pixels=settings.max_image_pixels, keep_crop=keep_crops,
        )
        stage.labels("decode").observe(prepared.decode_s)
        stage.labels("preprocess").observe(prepared.resize_s)
        arrays.append(prepared.pixels)
        crops.append(prepared.crop_jpeg)
    return arrays, crops


async def embed_uploads(
    services: Services, files: list[UploadFile], budget: WaitBudget, keep_crops: bool = False
) -> tuple[np.ndarray, list[bytes | None]]:
    """Every image decoded before any is embedded: one bad image fails the whole request. 503 when
    the images do not fit under the queue bound, 504 past the deadline: nothing embedded then."""
    settings = services.settings
    uploads = await read_uploads(files, settings.max_upload_bytes, settings.max_images_per_request)
    return await budget.run(len(uploads), lambda deadline: _decode_and_embed(services, uploads, keep_crops, deadline))


async def _decode_and_embed(
    services: Services, uploads: list[Upload], keep_crops: bool, deadline: float
) -> tuple[np.ndarray, list[bytes | None]]:
    settings = services.settings
    with services.batcher.expecting(len(uploads)) as announced:
        if sum(header_pixels(u.data) for u in uploads) <= settings.inline_decode_pixels:
            # A person crop decodes in ~0.1 ms: less than the two thread switches a worker thread
            # costs, and those switches wait for a core the model is using (measured: docs/service.md).
            arrays, crops = _prepare(services, uploads, keep_crops)
        else:
            arrays, crops = await run_in_threadpool(_prepare, services, uploads, keep_crops)
        vectors = await services.batcher.embed(arrays, announced, deadline)
    return vectors, crops
