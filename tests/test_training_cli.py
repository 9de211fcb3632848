"""The training command line end to end on a small synthetic set: synth -> train -> eval, resume, init, demo, errors."""

import json
import subprocess
import sys

import pytest
from PIL import Image
from safetensors import safe_open

from models import load_checkpoint
from models.checkpoint import read_checkpoint_info
from training.__main__ import build_parser, main
from models.hardware import cpu_info
from models.zoo import list_models
from training.ablation import CONFIGS as ABLATION_CONFIGS
from training.engine import read_state, side_paths
from training.precision import resolve_precision
from training.recipes import RECIPES

FAST = ["--recipe", "demo", "--input-size", "64", "32", "--batch-p", "4", "--batch-k", "2", "--quiet"]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=600)


def _single_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    synth = _run("synth", "--out", str(data), "--identities", "16", "--seed", "3")
    assert synth.returncode == 0, synth.stderr
    assert json.loads(synth.stdout.strip().splitlines()[-1])["train_identities"] == 8
    out = root / "run" / "model.safetensors"
    train = _run("train", "--data", str(data), "--out", str(out), "--epochs", "2", "--eval-every", "1", "--device", "cpu", *FAST)
    assert train.returncode == 0, train.stderr
    return data, out


def test_train_writes_checkpoint_state_and_log(trained):
    data, out = trained
    state_path, log_path = side_paths(out)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all("loss" in r and "lr" in r and "img_per_s" in r and "mAP" in r["eval"] for r in records)
    info = read_checkpoint_info(out)
    # auto precision: bf16 where this CPU multiplies it natively, else fp32; logged per epoch and in the checkpoint
    expected = resolve_precision("auto", "cpu", cpu_info())
    assert {r["precision"] for r in records} == {expected} and info.training["precision"] == expected
    assert info.arch == "hacnn" and tuple(info.input_size) == (64, 32)
    assert info.training["recipe"]["name"] == "demo" and info.training["counts"]["train_ids"] == 8
    best = max(records, key=lambda r: r["eval"]["mAP"])
    assert info.metrics["mAP"] == pytest.approx(best["eval"]["mAP"])
    assert read_state(state_path)["epoch"] == 2
    with safe_open(str(out), "pt") as f:  # the serving file carries no training-only classifier
        assert not any(k.startswith("classifier") for k in f.keys())
    # Calibrated at the end on the held-out split: the checkpoint carries its match threshold.
    assert info.calibration["far"] == 1e-3 and info.match_threshold == info.calibration["threshold"]
    assert info.calibration["genuine_pairs"] > 0 and info.calibration["impostor_pairs"] > 0
    assert info.calibration["data"] == str(data.resolve())


def test_eval_reproduces_the_training_time_figures(trained, tmp_path):
    data, out = trained
    result = _run("eval", "--checkpoint", str(out), "--data", str(data), "--device", "cpu", "--visualize", str(tmp_path / "vis"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(metrics) == {"rank1", "rank5", "rank10", "mAP", "mINP", "tar_at_far"}
    assert metrics["mAP"] == pytest.approx(read_checkpoint_info(out).metrics["mAP"], abs=1e-5)
    assert 0 <= metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"] <= 1
    # The same figures the calibration stored (same data, same weights).
    assert metrics["tar_at_far"] == read_checkpoint_info(out).calibration["tar_at_far"]
    pictures = sorted((tmp_path / "vis").glob("query_*.png"))
    assert pictures and pictures[0].stat().st_size > 1000
    histogram = Image.open(tmp_path / "vis" / "scores.png")
    assert histogram.size[0] >= 600 and len(histogram.getcolors(1 << 16)) > 10  # drawn, not blank


def test_calibrate_writes_the_threshold_and_keeps_the_weights(trained, tmp_path):
    data, out = trained
    source_bytes = out.read_bytes()
    copy = tmp_path / "calibrated.safetensors"
    result = _run("calibrate", "--checkpoint", str(out), "--data", str(data), "--far", "0.01", "--out", str(copy), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert out.read_bytes() == source_bytes  # --out: the source is left alone
    before, after = read_checkpoint_info(out), read_checkpoint_info(copy)
    assert after.fingerprint == before.fingerprint == printed["fingerprint"]
    assert after.calibration["far"] == 0.01 and after.match_threshold == printed["threshold"]
    assert after.calibration["tar_at_far"]["1e-2"] == printed["tar"]
    assert (after.arch, after.config, after.metrics, after.training) == (before.arch, before.config, before.metrics, before.training)
    with safe_open(str(out), "pt") as a, safe_open(str(copy), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())
    load_checkpoint(copy)  # the loader verifies the weights against the fingerprint
    # In place (no --out): replaced atomically, nothing left beside it.
    assert main(["calibrate", "--checkpoint", str(copy), "--data", str(data), "--far", "0.05", "--device", "cpu"]) == 0
    assert read_checkpoint_info(copy).calibration["far"] == 0.05
    assert read_checkpoint_info(copy).fingerprint == before.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibrated.safetensors"]


def test_openset_reports_dir_and_false_alarms_at_the_calibrated_threshold(trained, capsys):
    data, out = trained
    assert main(["openset", "--checkpoint", str(out), "--data", str(data), "--repeats", "2", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["threshold"] == read_checkpoint_info(out).match_threshold and report["threshold_source"] == "checkpoint"
    assert report["test_identities"] == 8 and report["enrolled_identities"] == 4 and report["repeats"] == 2
    assert 0 <= report["dir_at_threshold"] <= report["rank1"] <= 1 and 0 <= report["false_alarm_rate"] <= 1
    assert report["mated_queries"] > 0 and report["nonmated_queries"] > 0
    assert set(report["dir_at_far"]) == {"1e-1", "1e-2"}


def test_resume_continues_from_the_saved_epoch(trained, tmp_path):
    data, out = trained
    state_path, _ = side_paths(out)
    out2 = tmp_path / "model.safetensors"
    state2, log2 = side_paths(out2)
    state2.write_bytes(state_path.read_bytes())
    code = main(["train", "--data", str(data), "--out", str(out2), "--resume", str(state2), "--epochs", "3", "--quiet"])
    assert code == 0
    assert [json.loads(line)["epoch"] for line in log2.read_text().splitlines()] == [3]
    state = read_state(state2)
    assert state["epoch"] == 3
    assert [r["epoch"] for r in json.loads(state["history"])] == [1, 2, 3]
    load_checkpoint(out2)  # a valid serving checkpoint came out of the resumed run


def test_resume_of_a_finished_run_asks_for_more_epochs(trained, capsys):
    data, out = trained
    state_path, _ = side_paths(out)
    assert main(["train", "--data", str(data), "--out", str(out) + ".x", "--resume", str(state_path)]) == 2
    assert "larger --epochs" in _single_error_line(capsys.readouterr().err)


def test_init_is_deterministic_for_a_seed(tmp_path, capsys):
    assert main(["init", "--arch", "hacnn", "--out", str(tmp_path / "a.safetensors"), "--seed", "5"]) == 0
    assert main(["init", "--arch", "hacnn", "--out", str(tmp_path / "b.safetensors"), "--seed", "5"]) == 0
    assert main(["init", "--arch", "hacnn", "--out", str(tmp_path / "c.safetensors"), "--seed", "6"]) == 0
    a, b, c = (read_checkpoint_info(tmp_path / f"{n}.safetensors") for n in "abc")
    assert a.fingerprint == b.fingerprint != c.fingerprint
    model, info = load_checkpoint(tmp_path / "a.safetensors")
    assert info.arch == "hacnn" and tuple(info.input_size) == (160, 64) and info.training["init"] == "random"


def test_init_loads_imagenet_weights_for_resnet50(tmp_path):
    import torch

    from models import build_model

    donor = build_model("resnet50")
    torch.nn.init.constant_(donor.conv1.weight, 0.5)
    state = {k: v for k, v in donor.state_dict().items() if not k.startswith("bottleneck")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # torchvision's head: ignored
    torch.save(state, tmp_path / "resnet50.pth")
    assert main(["init", "--arch", "resnet50", "--out", str(tmp_path / "r.safetensors"), "--imagenet-weights", str(tmp_path / "resnet50.pth")]) == 0
    model, info = load_checkpoint(tmp_path / "r.safetensors")
    assert torch.all(model.conv1.weight == 0.5) and info.training["init"] == "imagenet"


def test_demo_builds_data_and_a_model_that_loads(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--identities", "8", "--epochs", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"mAP", "rank1"} <= set(summary["untrained"]) and {"mAP", "rank1"} <= set(summary["trained"])
    for split in ("bounding_box_train", "bounding_box_test", "query"):
        assert any((tmp_path / "data" / split).glob("*.jpg"))
    model, info = load_checkpoint(tmp_path / "model.safetensors")
    assert info.training["recipe"]["name"] == "demo"
    assert info.match_threshold is not None and summary["calibration"]["threshold"] == info.match_threshold


def _choices(command: str, option: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def test_arch_and_recipe_choices_are_the_registries():
    assert _choices("train", "--arch") == list_models() == _choices("init", "--arch")
    assert _choices("train", "--recipe") == list(RECIPES)
    assert "hacnn-mgat" in _choices("train", "--recipe")
    assert _choices("ablate", "--config") == list(ABLATION_CONFIGS)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--arch", "hacnn", "--data", "{tmp}/missing", "--out", "{tmp}/m.safetensors"], "no such data folder"),
        (["train", "--arch", "hacnn", "--data", "{tmp}", "--out", "{tmp}/m.safetensors"], "not a Market-1501-layout folder"),
        (["eval", "--checkpoint", "{tmp}/bad.safetensors", "--data", "{data}"], "not a readable safetensors file"),
        (["eval", "--checkpoint", "{tmp}/none.safetensors", "--data", "{data}"], "no such checkpoint file"),
        (["train", "--arch", "hacnn", "--data", "{data}", "--out", "{tmp}/m.safetensors", "--epochs", "0"], "--epochs must be at least 1"),
        (["train", "--data", "{data}", "--out", "{tmp}/m.safetensors"], "--arch is required"),
        (["train", "--arch", "vgg", "--data", "{data}", "--out", "{tmp}/m.safetensors"], "invalid choice"),
        (["train", "--arch", "hacnn", "--data", "{data}", "--out", "{tmp}/m.safetensors", "--resume", "{tmp}/bad.safetensors"], "not a readable training-state file"),
        (["init", "--arch", "resnet50", "--out", "{tmp}/r.safetensors", "--imagenet-weights", "{tmp}/nope.pth"], "no such ImageNet weights file"),
        (["train", "--arch", "hacnn", "--data", "{data}", "--out", "{tmp}/m.safetensors", "--batch-p", "50"], "has only 8 training identities"),
        (["train", "--arch", "hacnn", "--data", "{data}", "--out", "{tmp}/m.safetensors", "--input-size", "100", "50"], "multiple of 32"),
        (["train", "--recipe", "hacnn-mgat", "--data", "{data}", "--out", "{tmp}/m.safetensors", "--batch-k", "1"], "--batch-k must be at least 2 with MGAT"),
        (["train", "--arch", "hacnn", "--data", "{data}", "--out", "{tmp}/m.safetensors", "--warmup-fraction", "2"], "--warmup-fraction must be in [0, 1]"),
        (["train", "--arch", "hacnn", "--data", "{data}", "--out", "{tmp}/m.safetensors", "--precision", "fp8"], "invalid choice"),
        (["calibrate", "--checkpoint", "{out}", "--data", "{data}", "--far", "0"], "--far must be between 0 and 1"),
        (["calibrate", "--checkpoint", "{tmp}/bad.safetensors", "--data", "{data}"], "not a readable safetensors file"),
        (["calibrate", "--checkpoint", "{out}", "--data", "{tmp}/missing"], "no such data folder"),
        (["openset", "--checkpoint", "{out}", "--data", "{data}", "--enroll-fraction", "1.5"], "--enroll-fraction must be between 0 and 1"),
    ],
)
def test_cli_errors_are_one_line(trained, tmp_path, capsys, argv, expected):
    data, out = trained
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint at all")
    argv = [a.format(tmp=tmp_path, data=data, out=out) for a in argv]
    assert main(argv) == 2
    line = _single_error_line(capsys.readouterr().err)
    assert expected in line


def test_cli_error_in_a_real_process_exits_non_zero_without_traceback(tmp_path):
    result = _run("eval", "--checkpoint", str(tmp_path / "none.safetensors"), "--data", str(tmp_path))
    assert result.returncode != 0
    assert "no such" in _single_error_line(result.stderr)
