"""The serving checkpoint: a faithful round trip, and a named error for every kind of damage."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import CheckpointError, build_model, fingerprint, load_checkpoint, save_checkpoint
from models.checkpoint import FORMAT_VERSION, read_checkpoint_info, serving_state_dict, write_calibration

IMAGES = torch.randn(3, 3, 160, 64, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def saved(tmp_path, trained_like):
    """A real HA-CNN checkpoint on disk and the model it came from."""
    model = trained_like("hacnn", seed=1)
    path = tmp_path / "model.safetensors"
    info = save_checkpoint(
        model, path, training={"data": "synthetic", "epochs": 2}, metrics={"rank1": 0.5, "mAP": 0.25}
    )
    return path, model, info


def read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a real checkpoint, letting ``edit(tensors, metadata)`` change it in place."""
    tensors, metadata = read_raw(src)
    edit(tensors, metadata)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def test_round_trip_gives_identical_embeddings_and_the_same_fingerprint(saved):
    path, model, info = saved
    loaded, loaded_info = load_checkpoint(path, device="cpu")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES), model(IMAGES))
    assert loaded_info.fingerprint == info.fingerprint == fingerprint(serving_state_dict(model))
    assert loaded_info == read_checkpoint_info(path)
    assert loaded_info.arch == "hacnn" and loaded_info.embedding_dim == 1024
    assert loaded_info.input_size == (160, 64)
    assert loaded_info.training == {"data": "synthetic", "epochs": 2}
    assert loaded_info.metrics == {"rank1": 0.5, "mAP": 0.25}
    assert loaded_info.model_name == f"hacnn-{info.fingerprint[:12]}"
    assert not list(path.parent.glob("*.tmp")), "the atomic write leaves no temporary file behind"


def test_resnet50_round_trip_keeps_its_config(tmp_path, trained_like):
    model = trained_like("resnet50", last_stride=2, input_size=(128, 64))
    path = tmp_path / "r50.safetensors"
    save_checkpoint(model, path)
    loaded, info = load_checkpoint(path)
    assert info.config == {"last_stride": 2, "input_size": [128, 64]} and loaded.input_size == (128, 64)
    x = IMAGES[:2, :, :128]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_training_network_saves_as_its_serving_network(tmp_path):
    torch.manual_seed(0)
    model = build_model("hacnn", num_classes=9).eval()
    path = tmp_path / "trained.safetensors"
    save_checkpoint(model, path)
    tensors, _ = read_raw(path)
    assert not any(k.startswith("classifier") for k in tensors)
    loaded, _ = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES), model(IMAGES))


def test_output_and_fingerprint_are_deterministic(tmp_path, saved):
    path, model, info = saved
    a, _ = load_checkpoint(path)
    b, _ = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(a(IMAGES), b(IMAGES))
        assert torch.equal(a(IMAGES), a(IMAGES))
    again = save_checkpoint(model, tmp_path / "again.safetensors")
    assert again.fingerprint == info.fingerprint
    other = save_checkpoint(build_model("hacnn"), tmp_path / "other.safetensors")
    assert other.fingerprint != info.fingerprint


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.safetensors: no such checkpoint file"):
        load_checkpoint(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 100, "half", "all but one"])
def test_truncated_file(saved, tmp_path, keep):
    path, _, _ = saved
    data = path.read_bytes()
    n = {"half": len(data) // 2, "all but one": len(data) - 1}.get(keep, keep)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file \(truncated"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint_info(cut)


def test_not_a_safetensors_file(tmp_path, saved):
    _, model, _ = saved
    pickle = tmp_path / "model.pth"
    torch.save(model.state_dict(), pickle)
    text = tmp_path / "readme.safetensors"
    text.write_text("hello")
    for path in (pickle, text):
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_checkpoint(path)


def test_safetensors_file_that_is_not_a_reid_checkpoint(tmp_path, saved):
    _, model, _ = saved
    plain = tmp_path / "plain.safetensors"
    save_file(serving_state_dict(model), str(plain))  # weights, no metadata at all
    with pytest.raises(CheckpointError, match="not a re-id checkpoint"):
        load_checkpoint(plain)


def _set(key, value):
    def edit(tensors, metadata):
        metadata[key] = value

    return edit


def _drop_meta(key):
    def edit(tensors, metadata):
        del metadata[key]

    return edit


def _drop_tensor(tensors, metadata):
    del tensors["local_fc.0.weight"]


def _add_tensor(tensors, metadata):
    tensors["extra_head.weight"] = torch.zeros(4, 4)


def _reshape_tensor(tensors, metadata):
    tensors["global_fc.0.weight"] = torch.zeros(256, 384)


def _alter_weight(tensors, metadata):
    tensors["stem.0.weight"][0, 0, 0, 0] += 1e-3


def _other_arch(tensors, metadata):
    metadata["arch"] = "resnet50"
    metadata["config"] = json.dumps({"last_stride": 1, "input_size": [256, 128]})


CORRUPTIONS = {
    "unknown arch": (_set("arch", "vgg16"), "unknown architecture 'vgg16'"),
    "wrong arch": (_other_arch, r"weights do not fit arch 'resnet50': missing tensors \['bn1.bias'"),
    "bad config": (_set("config", json.dumps({"depth": 3})), "bad config for hacnn"),
    "missing tensor": (_drop_tensor, r"weights do not fit arch 'hacnn': missing tensors \['local_fc.0.weight'\]"),
    "extra tensor": (_add_tensor, r"weights do not fit arch 'hacnn': unexpected tensors \['extra_head.weight'\]"),
    "wrong shape": (_reshape_tensor, r"tensor global_fc.0.weight has shape \(256, 384\), arch 'hacnn' needs \(512, 384\)"),
    "newer format": (_set("format_version", str(FORMAT_VERSION + 1)), "newer than this software reads"),
    "bad format version": (_set("format_version", "one"), "format_version 'one' is not an integer"),
    "no format marker": (_drop_meta("format"), "not a re-id checkpoint"),
    "missing fingerprint": (_drop_meta("fingerprint"), "metadata lacks fingerprint"),
    "missing arch and config": (
        lambda t, m: (m.pop("arch"), m.pop("config")),
        "metadata lacks arch, config",
    ),
    "malformed input size": (_set("input_size", "160x64"), "malformed metadata"),
    "short mean": (_set("mean", "[0.5, 0.5]"), "mean and std 3 each"),
    "wrong embedding dim": (_set("embedding_dim", "2048"), "embedding_dim 2048 disagrees with arch 'hacnn'"),
    "altered weights": (_alter_weight, "weights do not match the recorded fingerprint"),
    "calibration not JSON": (_set("calibration", "{threshold: 0.7"), "malformed metadata"),
    "calibration not an object": (_set("calibration", "[0.7]"), "calibration is not a JSON object"),
    "calibration without threshold": (_set("calibration", '{"far": 0.001}'), "no finite numeric 'threshold'"),
    "calibration with a text threshold": (_set("calibration", '{"threshold": "high"}'), "no finite numeric 'threshold'"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_each_corruption_gives_its_named_error(saved, tmp_path, case):
    edit, message = CORRUPTIONS[case]
    path = rewrite(saved[0], tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value), "the message names the file"


def test_bit_flip_in_the_weights_is_caught_by_the_fingerprint(saved, tmp_path):
    data = bytearray(saved[0].read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes; the header stays valid
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(flipped)


def test_a_checkpoint_without_calibration_loads_with_no_threshold(saved):
    path, _, _ = saved
    _, metadata = read_raw(path)
    assert "calibration" not in metadata  # as every checkpoint written before calibration existed
    info = read_checkpoint_info(path)
    assert info.calibration == {} and info.match_threshold is None


def test_write_calibration_changes_the_metadata_only(saved, tmp_path):
    path, model, info = saved
    tensors_before, metadata_before = read_raw(path)
    out = tmp_path / "calibrated.safetensors"
    written = write_calibration(path, {"threshold": 0.7125, "far": 0.001}, out)
    tensors, metadata = read_raw(out)
    assert tensors.keys() == tensors_before.keys() and all(torch.equal(tensors[k], tensors_before[k]) for k in tensors)
    assert {k: v for k, v in metadata.items() if k != "calibration"} == metadata_before
    loaded, loaded_info = load_checkpoint(out)
    assert loaded_info == written and loaded_info.fingerprint == info.fingerprint
    assert loaded_info.match_threshold == 0.7125 and loaded_info.calibration["far"] == 0.001
    # In place, replacing the earlier calibration; no temporary file left behind.
    write_calibration(out, {"threshold": 0.5})
    assert read_checkpoint_info(out).calibration == {"threshold": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibrated.safetensors", "model.safetensors"]


def test_write_calibration_refuses_a_damaged_checkpoint_or_a_bad_threshold(saved, tmp_path):
    path = rewrite(saved[0], tmp_path / "altered.safetensors", _alter_weight)
    with pytest.raises(CheckpointError, match="weights do not match the recorded fingerprint"):
        write_calibration(path, {"threshold": 0.5})
    with pytest.raises(CheckpointError, match="finite numeric 'threshold'"):
        write_calibration(saved[0], {"threshold": float("nan")})
