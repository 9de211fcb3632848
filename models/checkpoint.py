"""The serving checkpoint: one ``.safetensors`` file, weights plus string metadata.

Loading never unpickles. Metadata keys (all strings, JSON where structured):

    format            "reid-checkpoint"
    format_version    integer; a newer one than FORMAT_VERSION is refused
    arch              name for ``build_model``
    config            JSON constructor arguments (the serving network: no classifiers)
    embedding_dim     integer
    input_size        JSON [H, W]
    mean, std         JSON normalisation, 3 floats each
    fingerprint       sha256 of the weights; identifies the embedding space
    training          JSON provenance: data, recipe, epochs ...
    metrics           JSON evaluation figures (rank1, mAP ...)
    created           ISO-8601 UTC time
    calibration       optional JSON: the match threshold and how it was fitted (threshold, far,
                      tar_at_far ...; written by ``python -m training calibrate``). Absent in
                      older or uncalibrated checkpoints: they load as before, with no threshold.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.zoo import IMAGENET_MEAN, IMAGENET_STD, build_model

FORMAT = "reid-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "arch", "config", "embedding_dim", "input_size", "mean", "std", "fingerprint")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CheckpointInfo:
    arch: str
    config: dict
    embedding_dim: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str
    format_version: int = FORMAT_VERSION
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str = ""
    calibration: dict = field(default_factory=dict)  # {} when the checkpoint was never calibrated

    @property
    def match_threshold(self) -> float | None:
        """The calibrated cosine threshold (score >= threshold: same person), None if uncalibrated."""
        return float(self.calibration["threshold"]) if self.calibration else None

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:12]

    @property
    def model_name(self) -> str:
        return f"{self.arch}-{self.short_fingerprint}"


def serving_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a serving checkpoint holds: everything but the training-only classifiers."""
    return {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.startswith("classifier")
    }


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: equal weights, equal hash."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    training: dict | None = None,
    metrics: dict | None = None,
    calibration: dict | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> CheckpointInfo:
    """Write the serving checkpoint atomically (temp file + rename) and return its info."""
    state = serving_state_dict(model)
    info = CheckpointInfo(
        arch=model.arch,
        config=dict(model.config),
        embedding_dim=int(model.embedding_dim),
        input_size=tuple(model.input_size),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        fingerprint=fingerprint(state),
        training=training or {},
        metrics=metrics or {},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        calibration=calibration or {},
    )
    _write(state, info, path)
    return info


def _metadata(info: CheckpointInfo) -> dict[str, str]:
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "arch": info.arch,
        "config": json.dumps(info.config, sort_keys=True),
        "embedding_dim": str(info.embedding_dim),
        "input_size": json.dumps(list(info.input_size)),
        "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)),
        "fingerprint": info.fingerprint,
        "training": json.dumps(info.training, sort_keys=True, default=str),
        "metrics": json.dumps(info.metrics, sort_keys=True),
        "created": info.created,
    }
    if info.calibration:
        metadata["calibration"] = json.dumps(info.calibration, sort_keys=True)
    return metadata


def _write(state: dict[str, torch.Tensor], info: CheckpointInfo, path: str | os.PathLike) -> None:
    """Atomically (temp file + rename): a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=_metadata(info))
    os.replace(tmp, path)


def _read(path: str | os.PathLike) -> tuple[Path, CheckpointInfo, dict[str, torch.Tensor]]:
    """(path, metadata, every tensor); CheckpointError for a file that cannot be read whole."""
    path, handle = _open(path)
    with handle as f:
        info = _parse_metadata(path, f.metadata())
        try:
            state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path}: tensor data unreadable (truncated or corrupt?): {e}") from None
    return path, info, state


def write_calibration(path: str | os.PathLike, calibration: dict, out: str | os.PathLike | None = None) -> CheckpointInfo:
    """Store ``calibration`` in the checkpoint's metadata (replacing any earlier one), into ``out``
    or in place. The weights are copied bit for bit, so the fingerprint stays; they are verified
    against it first, so a damaged file is never blessed with a threshold."""
    _check_calibration(Path(path), calibration)
    path, info, state = _read(path)
    if fingerprint(state) != info.fingerprint:
        raise CheckpointError(f"{path}: weights do not match the recorded fingerprint (file altered or corrupt)")
    info = dataclasses.replace(info, calibration=dict(calibration))
    _write(state, info, out if out is not None else path)
    return info


def _check_calibration(path: Path, calibration) -> None:
    if not isinstance(calibration, dict):
        raise CheckpointError(f"{path}: malformed metadata: calibration is not a JSON object")
    threshold = calibration.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise CheckpointError(f"{path}: malformed metadata: calibration has no finite numeric 'threshold'")


def _parse_metadata(path: Path, metadata: dict[str, str] | None) -> CheckpointInfo:
    if not metadata or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a re-id checkpoint (metadata 'format' is not {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    try:
        version = int(metadata["format_version"])
    except ValueError:
        raise CheckpointError(f"{path}: format_version {metadata['format_version']!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this software reads ({FORMAT_VERSION}); upgrade it"
        )
    try:
        input_size = tuple(int(v) for v in json.loads(metadata["input_size"]))
        mean = tuple(float(v) for v in json.loads(metadata["mean"]))
        std = tuple(float(v) for v in json.loads(metadata["std"]))
        info = CheckpointInfo(
            arch=metadata["arch"],
            config=json.loads(metadata["config"]),
            embedding_dim=int(metadata["embedding_dim"]),
            input_size=input_size,
            mean=mean,
            std=std,
            fingerprint=metadata["fingerprint"],
            format_version=version,
            training=json.loads(metadata.get("training", "{}")),
            metrics=json.loads(metadata.get("metrics", "{}")),
            created=metadata.get("created", ""),
            calibration=json.loads(metadata.get("calibration", "{}")),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed metadata: {e}") from None
    if len(input_size) != 2 or len(mean) != 3 or len(std) != 3 or not isinstance(info.config, dict):
        raise CheckpointError(f"{path}: malformed metadata: input_size needs 2 values, mean and std 3 each")
    if "calibration" in metadata:
        _check_calibration(path, info.calibration)
    return info


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return path, safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """The metadata alone, without building the model."""
    path, handle = _open(path)
    with handle as f:
        return _parse_metadata(path, f.metadata())


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Build the network the checkpoint describes, load and verify its weights, return it in eval mode."""
    path, info, state = _read(path)
    try:
        model = build_model(info.arch, num_classes=0, **info.config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{path}: weights do not fit arch {info.arch!r}: {'; '.join(parts)}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{path}: tensor {k} has shape {tuple(v.shape)}, arch {info.arch!r} needs {tuple(expected[k].shape)}"
            )
    if fingerprint(state) != info.fingerprint:
        raise CheckpointError(f"{path}: weights do not match the recorded fingerprint (file altered or corrupt)")
    if int(model.embedding_dim) != info.embedding_dim:
        raise CheckpointError(
            f"{path}: embedding_dim {info.embedding_dim} disagrees with arch {info.arch!r} ({model.embedding_dim})"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), info
