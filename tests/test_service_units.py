"""Service building blocks in-process: device choice, decoding guards, cache, batcher, and
ONNX Runtime agreeing with torch (the gallery's index and store: tests/test_gallery.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from models import embed, load_checkpoint
from models.preprocess import resize_normalize, resize_pixels
from service.batcher import Batcher
from service.cache import EmbeddingCache
from models.hardware import CpuInfo
from service.backend_choice import Candidate, candidates
from service.embedder import StartupError, load_embedder, plan_parallelism, resolve_device
from service.errors import ClientError
from service.imaging import decode_image, header_pixels
from service.schemas import validate_identity
from tests.service_support import jpeg, make_checkpoint, person_crop, png


def unit(rng, n, d=8):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- device and backend ------------------------------------------------------------------


def test_device_auto_picks_cuda_only_when_present():
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cpu", cuda_available=True) == "cpu"


def test_cuda_requested_without_gpu_is_a_startup_error():
    with pytest.raises(StartupError, match="no CUDA device"):
        resolve_device("cuda", cuda_available=False)


def test_parallelism_plan():
    # ONNX Runtime on CPU: one single-threaded pass per core (at most 8 passes).
    assert plan_parallelism("onnx", "cpu", 0, 0, cores=2) == (2, 1)
    assert plan_parallelism("onnx", "cpu", 0, 0, cores=16) == (8, 2)
    # torch: one pass, on all cores on CPU; the GPU needs one feeding thread.
    assert plan_parallelism("torch", "cpu", 0, 0, cores=4) == (1, 4)
    assert plan_parallelism("torch", "cuda", 0, 0, cores=4) == (1, 1)
    # What the operator sets is kept.
    assert plan_parallelism("onnx", "cpu", 1, 0, cores=4) == (1, 4)
    assert plan_parallelism("onnx", "cpu", 3, 2, cores=4) == (3, 2)


def test_backend_candidates_follow_the_settings_and_the_hardware():
    avx2 = CpuInfo("AMD EPYC", frozenset({"avx2"}))
    bf16 = CpuInfo("AMD EPYC", frozenset({"avx2", "avx512f", "avx512_bf16"}))
    # auto on CPU: OpenVINO and ONNX Runtime compete; bf16 only where the CPU has it natively.
    assert candidates("auto", "auto", "cpu", avx2) == [Candidate("openvino", "fp32"), Candidate("onnx", "fp32")]
    assert candidates("auto", "auto", "cpu", bf16)[0] == Candidate("openvino", "bf16")
    assert candidates("auto", "auto", "cuda", avx2) == [Candidate("torch", "fp16"), Candidate("torch", "fp32")]
    assert candidates("torch", "auto", "cpu", bf16) == [Candidate("torch", "fp32")]
    with pytest.raises(StartupError, match="no native bf16"):
        candidates("openvino", "bf16", "cpu", avx2)
    with pytest.raises(StartupError, match="CPU only"):
        candidates("onnx", "auto", "cuda", avx2)
    with pytest.raises(StartupError, match="bf16 needs backend openvino"):
        candidates("onnx", "bf16", "cpu", bf16)


def test_onnx_and_torch_backends_agree(tmp_path, trained_like):
    from models import save_checkpoint

    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(trained_like("hacnn", seed=3), checkpoint)
    onnx = load_embedder(checkpoint, device="cpu", backend="onnx", data_dir=tmp_path)
    eager = load_embedder(checkpoint, device="cpu", backend="torch", data_dir=tmp_path)
    info = onnx.info
    crops = [person_crop(i, v) for i in range(4) for v in range(2)]
    pixels = np.stack([resize_pixels(c, info.input_size) for c in crops])
    a, b = onnx.embed(pixels), eager.embed(pixels)
    assert a.shape == (8, info.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.abs(a - b).max() < 1e-4
    # Both backends normalise the pixels exactly as training's evaluation does.
    model, _ = load_checkpoint(checkpoint)
    expected = embed(model, torch.stack([resize_normalize(c, info.input_size, info.mean, info.std) for c in crops]))
    assert np.abs(a - expected.numpy()).max() < 1e-4
    assert np.abs(b - expected.numpy()).max() < 1e-5
    # The export is cached under the data dir, keyed by fingerprint, and reused.
    cached = list((tmp_path / "onnx").glob(f"*{info.fingerprint}*.onnx"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    load_embedder(checkpoint, device="cpu", backend="onnx", data_dir=tmp_path)
    assert cached[0].stat().st_mtime_ns == mtime


# -- decoding -----------------------------------------------------------------------------

INPUT = (160, 64)


def test_decode_rejects_empty_and_non_images():
    with pytest.raises(ClientError) as e:
        decode_image(b"", filename="a.jpg", input_size=INPUT, max_pixels=10**6)
    assert e.value.status == 422 and "empty" in e.value.detail
    with pytest.raises(ClientError) as e:
        decode_image(b"%PDF-1.4 not a picture", filename="doc.pdf", input_size=INPUT, max_pixels=10**6)
    assert e.value.status == 415 and "doc.pdf" in e.value.detail and "not an image" in e.value.detail


def test_decode_rejects_truncated_image():
    data = jpeg(person_crop(0))
    with pytest.raises(ClientError) as e:
        decode_image(data[: len(data) // 3], filename="cut.jpg", input_size=INPUT, max_pixels=10**6)
    assert e.value.status == 415


def test_header_pixels_reads_the_size_without_decoding():
    assert header_pixels(png(Image.new("RGB", (2000, 1000)))) == 2_000_000
    assert header_pixels(jpeg(person_crop(0))) == 64 * 128
    assert header_pixels(b"%PDF-1.4 not a picture") == 0  # decoding it then says why


def test_decode_checks_pixels_from_the_header():
    big = png(Image.new("RGB", (2000, 1000)))  # small file, 2 Mpx
    with pytest.raises(ClientError) as e:
        decode_image(big, filename="big.png", input_size=INPUT, max_pixels=1_000_000)
    assert e.value.status == 413 and "2000x1000" in e.value.detail


def test_big_jpeg_decodes_in_draft_mode_but_stays_above_input_size():
    data = jpeg(person_crop(1, size=(1024, 2048)))
    decoded = decode_image(data, filename="big.jpg", input_size=INPUT, max_pixels=10**8, keep_crop=True)
    w, h = decoded.image.size
    assert w < 1024 and h < 2048  # reduced DCT scale
    assert w >= 2 * INPUT[1] and h >= 2 * INPUT[0]
    stored = Image.open(__import__("io").BytesIO(decoded.crop_jpeg))
    assert stored.format == "JPEG" and max(stored.size) <= 512


def test_small_jpeg_crop_is_stored_as_uploaded():
    data = jpeg(person_crop(2))
    assert decode_image(data, filename="a.jpg", input_size=INPUT, max_pixels=10**6, keep_crop=True).crop_jpeg == data


def test_phone_photo_is_turned_upright_by_its_exif_orientation():
    upright = person_crop(3)  # 64 x 128, taller than wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels lie on their side
    out = __import__("io").BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(out, format="JPEG", quality=95, exif=exif)
    decoded = decode_image(out.getvalue(), filename="phone.jpg", input_size=INPUT, max_pixels=10**6)
    assert decoded.image.size == upright.size and decoded.image.mode == "RGB"
    diff = np.abs(np.asarray(decoded.image, dtype=np.float32) - np.asarray(upright, dtype=np.float32)).mean()
    assert diff < 8  # the same picture, up to JPEG loss


# -- identities, cache --------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", "   ", "x" * 129, "a/b", "bell\x07", "tab\there"])
def test_bad_identities_are_refused(raw):
    with pytest.raises(ClientError) as e:
        validate_identity(raw)
    assert e.value.status == 422 and "identity" in e.value.detail


def test_identity_is_trimmed():
    assert validate_identity("  Alice Smith ") == "Alice Smith"
    assert validate_identity("x" * 128) == "x" * 128


def test_cache_evicts_least_recently_used_and_expires():
    now = [0.0]
    cache = EmbeddingCache(max_size=2, ttl_s=10, clock=lambda: now[0])
    a, b = cache.put(np.ones(2)), cache.put(np.zeros(2))
    assert cache.get(a) is not None  # a is now the most recent
    c = cache.put(np.full(2, 2.0))
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None
    now[0] = 10.0
    assert cache.get(a) is None and cache.get(c) is None


def test_cache_does_not_keep_the_whole_batch_of_a_cached_row_alive():
    batch = np.ones((32, 1024), np.float32)  # a forward pass's output; requests get rows of it
    cache = EmbeddingCache(max_size=10, ttl_s=10)
    kept = cache.get(cache.put(batch[3]))
    assert kept.base is None and kept.nbytes == 4096


# -- batcher ------------------------------------------------------------------------------


def test_batcher_shares_forward_passes_between_concurrent_callers(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "m.safetensors")
    model, info = load_checkpoint(checkpoint)
    sizes = []

    @torch.inference_mode()
    def run(images):
        return torch.nn.functional.normalize(model(torch.from_numpy(images)), dim=1).numpy()

    batcher = Batcher(run, max_batch_size=8, max_wait_s=0.05, on_batch=lambda n, t, waits: sizes.append(n))
    image = resize_normalize(person_crop(0), info.input_size, info.mean, info.std).numpy()
    results, start = [None] * 8, threading.Barrier(8)

    def call(i):
        start.wait()
        results[i] = batcher.embed_sync([image])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert sum(sizes) == 8 and max(sizes) > 1
    for r in results:  # every caller got the embedding of its own image
        np.testing.assert_allclose(r, results[0], atol=1e-5)


def test_batcher_workers_run_forward_passes_side_by_side():
    both_inside = threading.Barrier(2, timeout=10)  # broken (an error) unless two passes overlap

    def run(images):
        both_inside.wait()
        return images.reshape(len(images), -1)[:, :4] * 2

    batcher = Batcher(run, max_batch_size=1, max_wait_s=0, workers=2)
    assert batcher.workers == 2
    images = [np.full((3, 2, 2), i, np.float32) for i in range(4)]
    results = [None] * 4

    def call(i):
        results[i] = batcher.embed_sync([images[i]])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    for i, r in enumerate(results):  # each caller got its own image's result back
        np.testing.assert_array_equal(r, np.full((1, 4), 2 * i))


def test_batcher_close_finishes_queued_work_then_stops_every_worker():
    release = threading.Event()

    def run(images):
        release.wait(10)
        return images.reshape(len(images), -1)

    batcher = Batcher(run, max_batch_size=1, max_wait_s=0, workers=2)
    futures = [batcher.submit(np.zeros((3, 2, 2), np.float32)) for _ in range(5)]
    time.sleep(0.2)  # two passes have started and block; three images wait in the queue
    closer = threading.Thread(target=batcher.close)
    closer.start()
    release.set()
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert all(f.done() and not f.cancelled() for f in futures)  # in-flight requests get their answers
    assert not [t for t in threading.enumerate() if t.name.startswith("reid-batcher")]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(np.zeros((3, 2, 2), np.float32))
