"""The training loop: model + losses, optimiser and schedule, evaluation, checkpoints, resume.

Files a run writes, next to ``--out`` (say ``run/model.safetensors``):

    run/model.safetensors          the best serving checkpoint by mAP (models.save_checkpoint)
    run/model.train-state.pt       everything --resume needs; plain tensors and containers only,
                                   read back with torch.load(weights_only=True)
    run/model.train-log.jsonl      one JSON object per epoch: losses, lr, img/s, evaluation

Multi-GPU: launched by torchrun (WORLD_SIZE / LOCAL_RANK in the environment) every rank
trains on its own P x K stream under DistributedDataParallel; only rank 0 evaluates and
writes files.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from models import IMAGENET_MEAN, IMAGENET_STD, build_model, save_checkpoint
from models.mgat import MGAT
from training.calibration import calibrate_checkpoint, summary as calibration_summary
from models.progress import progress
from training.data import ReIDData, TrainImages
from training.embeddings import evaluate_model
from training.losses import batch_hard_triplet, cross_entropy_smooth, mgat_losses
from training.recipes import Recipe
from training.sampler import PKBatchSampler
from training.transforms import TrainTransform

STATE_VERSION = 1
PRELOAD_LIMIT_BYTES = 2 << 30  # decode the training set into memory when it fits in this


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda asked for, but no CUDA device is available (use --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise TrainingError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def default_workers() -> int:
    """0 on a small CPU box: images are decoded once and augmentation costs ~0.1 ms, so a worker
    process would only take a core from the network's own threads. More cores: feed the GPU."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus // 2)


def side_paths(out: str | Path) -> tuple[Path, Path]:
    """(training-state file, JSON-lines log) beside the serving checkpoint."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + ".train-state.pt"), out.with_name(stem + ".train-log.jsonl")


def load_imagenet_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision resnet50 state dict from a local .safetensors or .pth file (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such ImageNet weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path}: cannot read ImageNet weights: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TrainingError(f"{path}: not a state dict")
    return state


def build_network(recipe: Recipe, num_classes: int, imagenet_weights: str | None = None) -> nn.Module:
    model = build_model(recipe.arch, num_classes=num_classes, input_size=list(recipe.input_size), **recipe.model_config)
    if imagenet_weights:
        if recipe.arch != "resnet50":
            raise TrainingError("--imagenet-weights applies to resnet50 only (HA-CNN trains from scratch)")
        try:
            model.load_imagenet_state_dict(load_imagenet_weights(imagenet_weights))
        except ValueError as e:
            raise TrainingError(f"{imagenet_weights}: {e}") from None
    return model


class TrainingNet(nn.Module):
    """The network, its classifiers and the optional MGAT layer, with the loss in ``forward``
    (one module, so DistributedDataParallel synchronises every trainable parameter)."""

    def __init__(self, model: nn.Module, recipe: Recipe, num_classes: int):
        super().__init__()
        self.model = model
        self.recipe = recipe
        # MGAT refines the test-time embedding (ResNet-50: the BNNeck output), so the OF loss
        # shapes exactly the vector the service ranks with.
        self.mgat = (
            MGAT(model.embedding_dim, num_classes, gamma=recipe.mgat_gamma, learnable_weight=recipe.mgat_learnable_w)
            if recipe.mgat
            else None
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = self.recipe
        out = self.model(images)
        parts = {"id": sum(cross_entropy_smooth(lg, labels, r.label_smoothing) for lg in out["logits"])}
        if r.triplet_weight > 0:
            feats = out["features"]
            parts["triplet"] = sum(batch_hard_triplet(f, labels, r.margin, r.soft_margin) for f in feats) / len(feats)
        if self.mgat is not None:
            parts["mgat_id"], parts["of"] = mgat_losses(
                self.mgat, out["embedding"], labels, r.label_smoothing, detach_refined=r.of_detach
            )
        weights = {"id": 1.0, "triplet": r.triplet_weight, "mgat_id": r.mgat_weight, "of": r.of_weight}
        total = sum(weights[k] * v for k, v in parts.items())
        return total, parts


def make_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=True
        )
    raise TrainingError(f"unknown optimizer {recipe.optimizer!r}: use adam or sgd")


def lr_factor(recipe: Recipe, epoch: int) -> float:
    """Multiplier of the base lr for 0-based ``epoch``: linear warm-up, then step decay."""
    if epoch < recipe.warmup_epochs:
        return recipe.warmup_factor + (1 - recipe.warmup_factor) * epoch / recipe.warmup_epochs
    return recipe.lr_decay ** sum(epoch >= s for s in recipe.lr_step_epochs())


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8),
        "numpy": torch.tensor(list(json.dumps(_np_state()).encode()), dtype=torch.uint8),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def read_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such training-state file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path}: not a readable training-state file: {e}") from None
    if not isinstance(state, dict) or state.get("state_version") != STATE_VERSION:
        raise TrainingError(f"{path}: not a training-state file of version {STATE_VERSION}")
    return state


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class RunOptions:
    """How to run (not what to learn: that is the recipe)."""

    out: str
    device: str = "auto"
    workers: int | None = None
    amp: bool = True
    eval_batch_size: int = 64
    imagenet_weights: str | None = None
    eval_at_start: bool = False  # also score the untrained network (the demo prints both)
    progress: bool = True


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def train(recipe: Recipe, data: ReIDData, opts: RunOptions, resume: str | None = None) -> dict:
    """Train, evaluate and write the files; returns a summary (best metrics, paths, timings)."""
    world, rank, local_rank = _distributed()
    is_main = rank == 0
    device = resolve_device(opts.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    out = Path(opts.out)
    state_path, log_path = side_paths(out)
    state = read_state(resume) if resume else None

    torch.manual_seed(recipe.seed)  # same initial weights on every rank
    random.seed(recipe.seed + rank)
    np.random.seed(recipe.seed + rank)
    model = build_network(recipe, data.num_train_ids, None if state else opts.imagenet_weights)
    net = TrainingNet(model, recipe, data.num_train_ids).to(device)
    torch.manual_seed(recipe.seed + 7919 * rank)  # augmentation: each rank its own stream
    optimizer = make_optimizer(recipe, net.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(recipe, e))
    use_amp = opts.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best, history, elapsed = 0, None, [], 0.0
    if state is not None:
        if state["num_classes"] != data.num_train_ids:
            raise TrainingError(
                f"{resume}: trained on {state['num_classes']} identities, this data has {data.num_train_ids}"
            )
        try:
            net.load_state_dict(state["net"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainingError(f"{resume}: does not fit this recipe/architecture: {str(e).splitlines()[0]}") from None
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        best = json.loads(state["best"]) if state.get("best") else None
        history = json.loads(state.get("history", "[]"))
        elapsed = float(state.get("elapsed_s", 0.0))
        _set_rng_state(state["rng"])
        # A schedule extended by a larger --epochs follows the recipe now in force.
        scheduler.lr_lambdas[0] = lambda e: lr_factor(recipe, e)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(recipe, start_epoch)
        if start_epoch >= recipe.epochs:
            raise TrainingError(
                f"{resume}: already trained {start_epoch} epochs; pass a larger --epochs to continue"
            )

    workers = default_workers() if opts.workers is None else opts.workers
    dataset_bytes = len(data.train) * recipe.input_size[0] * recipe.input_size[1] * 3
    images = TrainImages(
        data.train,
        recipe.input_size,
        TrainTransform(IMAGENET_MEAN, IMAGENET_STD, recipe.flip_p, recipe.pad, recipe.erase_p),
        preload=False,
    )
    if dataset_bytes <= PRELOAD_LIMIT_BYTES:
        for i in progress(range(len(images)), desc="decode", unit="img", enabled=opts.progress and is_main, leave=False):
            images.pixels(i)
    sampler = PKBatchSampler(images.labels, recipe.batch_p, recipe.batch_k, seed=recipe.seed, rank=rank, world_size=world)
    loader = torch.utils.data.DataLoader(
        images,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    train_net = net
    if world > 1:
        train_net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    training_meta = {
        "recipe": recipe.to_dict(),
        "data": str(Path(data.root).resolve()),
        "counts": data.counts(),
        "device": str(device),
        "world_size": world,
        "amp": use_amp,
        "imagenet_weights": opts.imagenet_weights,
        "torch": torch.__version__,
    }

    def evaluate(epoch: int) -> dict:
        metrics, _ = evaluate_model(
            model, data, IMAGENET_MEAN, IMAGENET_STD, device, batch_size=opts.eval_batch_size, workers=workers
        )
        return {"epoch": epoch, **metrics}

    def log(record: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    if is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        if state is None and log_path.exists():
            log_path.unlink()
    untrained = None
    if opts.eval_at_start and state is None and is_main:
        untrained = evaluate(0)
        training_meta["untrained_metrics"] = untrained
        log({"epoch": 0, "eval": untrained})

    last_eval = None
    for epoch in range(start_epoch, recipe.epochs):
        sampler.set_epoch(epoch)
        train_net.train()
        t0 = time.time()
        sums: dict[str, float] = {}
        seen, steps = 0, 0
        bar = progress(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch", enabled=opts.progress and is_main, leave=False)
        for batch, labels in bar:
            batch = batch.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                total, parts = train_net(batch, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            if not math.isfinite(float(total.detach())):
                raise TrainingError(f"loss became {float(total)} at epoch {epoch + 1}; lower --lr")
            steps += 1
            seen += len(batch)
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}", ips=f"{seen / (time.time() - t0):.0f}")
        epoch_time = time.time() - t0
        elapsed += epoch_time
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = {
            "epoch": epoch + 1,
            **{k: round(v / max(steps, 1), 5) for k, v in sums.items()},
            "lr": lr,
            "img_per_s": round(seen * world / epoch_time, 2),
            "time_s": round(epoch_time, 2),
        }
        final = epoch + 1 == recipe.epochs
        if is_main:
            if final or (recipe.eval_every > 0 and (epoch + 1) % recipe.eval_every == 0):
                last_eval = evaluate(epoch + 1)
                record["eval"] = last_eval
                if best is None or last_eval["mAP"] > best["mAP"]:
                    best = last_eval
                    meta = {**training_meta, "epochs": epoch + 1, "best_epoch": epoch + 1, "train_time_s": round(elapsed, 1)}
                    save_checkpoint(model, out, training=meta, metrics=best)
            history.append(record)
            log(record)
            msg = f"epoch {epoch + 1}/{recipe.epochs} loss {record['loss']:.4f} lr {lr:.2e} {record['img_per_s']:.1f} img/s"
            if "eval" in record:
                msg += f" | mAP {last_eval['mAP']:.4f} rank1 {last_eval['rank1']:.4f}"
            tqdm.write(msg)
            _atomic_torch_save(
                {
                    "state_version": STATE_VERSION,
                    "net": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "num_classes": data.num_train_ids,
                    "recipe": json.dumps(recipe.to_dict()),
                    "best": json.dumps(best) if best else "",
                    "history": json.dumps(history),
                    "elapsed_s": elapsed,
                    "rng": _rng_state(),
                },
                state_path,
            )
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    calibration = _calibrate(out, data, device, opts.eval_batch_size, workers) if is_main and best is not None else None
    return {
        "out": str(out),
        "state": str(state_path),
        "log": str(log_path),
        "best": best,
        "last": last_eval,
        "untrained": untrained,
        "train_time_s": round(elapsed, 1),
        "img_per_s": history[-1]["img_per_s"] if history else None,
        "calibration": calibration,
    }


def _calibrate(out: Path, data: ReIDData, device, batch_size: int, workers: int) -> dict | None:
    """Fit the match threshold of the written checkpoint on the held-out split (docs/training.md)."""
    try:
        calibration = calibrate_checkpoint(out, data, device=device, batch_size=batch_size, workers=workers)
    except ValueError as e:  # e.g. no same-person pair across cameras: the checkpoint stays uncalibrated
        tqdm.write(f"warning: {out} not calibrated: {e}")
        return None
    tqdm.write(f"calibrated: match threshold {calibration['threshold']:.4f} at FAR {calibration['far']:g} "
               f"(TAR {calibration['tar']:.3f}) written into {out}")
    return calibration_summary(calibration)


def recipe_from_state(path: str | Path) -> dict:
    """The recipe (as a dict) a training-state file was written under."""
    return json.loads(read_state(path)["recipe"])
