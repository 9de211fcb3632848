"""Upload bytes -> a decoded RGB crop, with the guards a public endpoint needs."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.preprocess import resize_pixels
from service.errors import ClientError

# Crops kept for reembed are capped at this size: ample for either architecture's input.
CROP_MAX_SIDE = 512
CROP_JPEG_QUALITY = 95


@dataclass
class DecodedImage:
    image: Image.Image  # RGB
    crop_jpeg: bytes | None  # what the gallery stores (None when crops are not kept)


def header_pixels(data: bytes) -> int:
    """width x height read from the header alone; 0 when Pillow cannot even read that (decoding
    then fails at once, with the reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 0


def decode_image(
    data: bytes,
    *,
    filename: str,
    input_size: tuple[int, int],
    max_pixels: int,
    keep_crop: bool = False,
) -> DecodedImage:
    """Decode one upload; ClientError (4xx) for anything that is not a usable image."""
    if not data:
        raise ClientError(422, "empty_upload", f"{filename}: empty upload")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit (below) replaces Pillow's process-wide one and its warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # header only: nothing decoded yet
            if width * height > max_pixels:
                raise ClientError(
                    413, "too_many_pixels", f"{filename}: {width}x{height} pixels exceeds the limit of {max_pixels}"
                )
            if image.format == "JPEG":
                # Decode big JPEGs at a reduced DCT scale: still at least twice the network input.
                h, w = input_size
                image.draft("RGB", (w * 2, h * 2))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright crop
            if image.mode != "RGB":
                image = image.convert("RGB")
    except ClientError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        if isinstance(e, UnidentifiedImageError):
            raise ClientError(415, "not_image", f"{filename}: not an image Pillow can read") from None
        raise ClientError(413, "too_many_pixels", f"{filename}: image too large to decode") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ClientError(415, "not_image", f"{filename}: damaged or unsupported image ({e})") from None
    if image.width < 1 or image.height < 1:
        raise ClientError(415, "not_image", f"{filename}: image has no pixels")
    crop = crop_jpeg(data, (width, height), image) if keep_crop else None
    return DecodedImage(image=image, crop_jpeg=crop)


def crop_jpeg(original: bytes, original_size: tuple[int, int], image: Image.Image) -> bytes:
    """The crop to store: the upload itself when it is already a modest JPEG, else a re-encode."""
    if original[:3] == b"\xff\xd8\xff" and max(original_size) <= CROP_MAX_SIDE and len(original) <= 1024 * 1024:
        return original
    small = image.copy()
    small.thumbnail((CROP_MAX_SIDE, CROP_MAX_SIDE), Image.BILINEAR)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=CROP_JPEG_QUALITY)
    return out.getvalue()


@dataclass
class PreparedImage:
    pixels: np.ndarray  # H x W x 3 uint8 at the model's input size: what the batcher takes
    crop_jpeg: bytes | None
    decode_s: float
    resize_s: float


def prepare_image(
    data: bytes, *, filename: str, input_size: Sequence[int], max_pixels: int, keep_crop: bool = False
) -> PreparedImage:
    """Upload bytes -> model-ready pixels (and the crop to store): the one way every path
    (HTTP uploads, `import`, `reembed`) turns an image into model input."""
    t0 = time.perf_counter()
    decoded = decode_image(data, filename=filename, input_size=input_size, max_pixels=max_pixels, keep_crop=keep_crop)
    t1 = time.perf_counter()
    pixels = resize_pixels(decoded.image, input_size)
    return PreparedImage(pixels, decoded.crop_jpeg, t1 - t0, time.perf_counter() - t1)
