"""Serving backends and the start-up choice among them (service/backends.py, service/backend_choice.py):
OpenVINO agrees with the fp32 reference, auto never serves a candidate that failed its accuracy
check, and the measured choice is cached per checkpoint and machine."""

import numpy as np
import pytest

from models import save_checkpoint
from models.hardware import CpuInfo
from models.preprocess import resize_pixels
from service.backend_choice import DEFAULT_MIN_COSINE, Trial, cache_path, choose
from service.embedder import StartupError, load_embedder
from tests.service_support import person_crop

AVX2 = CpuInfo("test CPU without bf16", frozenset({"avx2"}))


@pytest.fixture
def checkpoint(tmp_path_factory, trained_like):
    path = tmp_path_factory.mktemp("backends") / "model.safetensors"
    save_checkpoint(trained_like("hacnn", seed=5), path)
    return path


def crops_pixels(input_size):
    return np.stack([resize_pixels(person_crop(i, v), input_size) for i in range(4) for v in range(2)])


def test_openvino_fp32_embeddings_equal_the_torch_reference(checkpoint, tmp_path):
    openvino = load_embedder(checkpoint, device="cpu", backend="openvino", precision="fp32", data_dir=tmp_path, cpu=AVX2)
    eager = load_embedder(checkpoint, device="cpu", backend="torch", data_dir=tmp_path)
    assert (openvino.backend, openvino.precision) == ("openvino", "fp32")
    pixels = crops_pixels(openvino.info.input_size)
    a, b = openvino.embed(pixels), eager.embed(pixels)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) >= DEFAULT_MIN_COSINE


def test_the_fastest_candidate_that_passes_the_check_is_chosen():
    fast_but_off = Trial("openvino", "bf16", min_cosine=0.98, images_per_s=900.0)
    accurate = Trial("openvino", "fp32", min_cosine=0.99999, images_per_s=300.0)
    slower = Trial("onnx", "fp32", min_cosine=0.99999, images_per_s=250.0)
    assert choose([fast_but_off, accurate, slower], 0.999) == accurate
    assert choose([fast_but_off, accurate, slower], 0.95) == fast_but_off
    with pytest.raises(StartupError, match="REID_MIN_COSINE 0.999999"):
        choose([fast_but_off, accurate, slower], 0.999999)


def test_auto_measures_once_per_checkpoint_and_machine(checkpoint, tmp_path):
    first = load_embedder(checkpoint, device="cpu", backend="auto", data_dir=tmp_path, cpu=AVX2)
    assert first.backend in ("openvino", "onnx") and first.precision == "fp32"  # no bf16 on this CPU
    assert not first.check.from_cache
    assert {(t.backend, t.precision) for t in first.check.trials} == {("openvino", "fp32"), ("onnx", "fp32")}
    assert all(t.min_cosine >= first.check.required_min_cosine for t in first.check.trials if
               (t.backend, t.precision) == (first.backend, first.precision))
    assert cache_path(tmp_path, first.info.fingerprint, AVX2.key()).is_file()

    again = load_embedder(checkpoint, device="cpu", backend="auto", data_dir=tmp_path, cpu=AVX2)
    assert again.check.from_cache and again.backend == first.backend

    other_machine = CpuInfo("another CPU", frozenset({"avx2"}))
    elsewhere = load_embedder(checkpoint, device="cpu", backend="auto", data_dir=tmp_path, cpu=other_machine)
    assert not elsewhere.check.from_cache


def test_a_tolerance_no_candidate_meets_stops_the_start_with_one_line(checkpoint, tmp_path):
    with pytest.raises(StartupError) as e:
        load_embedder(checkpoint, device="cpu", backend="auto", data_dir=tmp_path, cpu=AVX2, min_cosine=1.0 + 1e-9)
    assert "REID_MIN_COSINE" in str(e.value) and "\n" not in str(e.value)


def test_bf16_on_a_cpu_without_it_is_refused_before_loading(checkpoint, tmp_path):
    with pytest.raises(StartupError, match="no native bf16"):
        load_embedder(checkpoint, device="cpu", backend="openvino", precision="bf16", data_dir=tmp_path, cpu=AVX2)
