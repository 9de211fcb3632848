"""The training loop: model + losses, optimiser and schedule, evaluation, checkpoints, resume.

Files a run writes, next to ``--out`` (say ``run/model.safetensors``):

    run/model.safetensors          the best serving checkpoint by mAP (models.save_checkpoint)
    run/model.train-state.pt       everything --resume needs; plain tensors and containers only,
                                   read back with torch.load(weights_only=True)
    run/model.train-log.jsonl      one JSON object per epoch: losses, lr, img/s, evaluation

``train`` reads as its steps: ``prepare_run`` (device and process group, network, optimiser
and schedule, resume, decoding the images), ``train_epoch`` (``train_step`` per batch),
``evaluate_and_keep_best``, ``save_state``; then the match threshold is calibrated.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from models import IMAGENET_MEAN, IMAGENET_STD, build_model, save_checkpoint
from models.hardware import cpu_info
from models.mgat import MGAT
from training.calibration import calibrate_checkpoint, summary as calibration_summary
from models.progress import progress
from training.data import ReIDData, TrainImages
from training.embeddings import evaluate_model
from training.losses import batch_hard_triplet, cross_entropy_smooth, mgat_losses
from training.precision import PrecisionError, autocast, resolve_precision
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
    warmup = recipe.warmup()
    if epoch < warmup:
        return recipe.warmup_factor + (1 - recipe.warmup_factor) * epoch / warmup
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
    amp: bool = True  # False: no fp16 mixed precision on a CUDA GPU without bf16 (--no-amp)
    precision: str = "auto"  # auto | fp32 | bf16 (training.precision)
    eval_batch_size: int = 64
    imagenet_weights: str | None = None
    eval_at_start: bool = False  # also score the untrained network (the demo prints both)
    progress: bool = True


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


@dataclass
class Run:
    """One training run's parts, built by prepare_run and advanced one epoch at a time."""

    recipe: Recipe
    data: ReIDData
    opts: RunOptions
    device: torch.device
    world: int
    rank: int
    precision: str
    model: nn.Module  # the serving network (what the checkpoint holds)
    net: TrainingNet  # model + classifiers + MGAT + loss
    train_net: nn.Module  # net, or net under DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: PKBatchSampler
    loader: torch.utils.data.DataLoader
    workers: int
    out: Path
    state_path: Path
    log_path: Path
    training_meta: dict
    start_epoch: int = 0
    best: dict | None = None
    last_eval: dict | None = None
    untrained: dict | None = None
    history: list = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _set_up_device(opts: RunOptions, world: int, local_rank: int) -> torch.device:
    """The device, and under torchrun the process group (NCCL on GPUs, Gloo on CPUs)."""
    device = resolve_device(opts.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _precision_for(opts: RunOptions, device: torch.device) -> str:
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            precision = resolve_precision(opts.precision, device.type, cpu_info(), cuda_bf16=cuda_bf16, amp=opts.amp)
    except PrecisionError as e:
        raise TrainingError(str(e)) from None
    for w in caught:  # one line each, like every other message of the CLI
        tqdm.write(f"warning: {w.message}")
    return precision


def _restore(run: Run, state: dict, resume: str) -> None:
    """Continue from a training-state file: weights, optimiser, schedule, RNGs, history."""
    recipe = run.recipe
    if state["num_classes"] != run.data.num_train_ids:
        raise TrainingError(f"{resume}: trained on {state['num_classes']} identities, this data has {run.data.num_train_ids}")
    try:
        run.net.load_state_dict(state["net"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainingError(f"{resume}: does not fit this recipe/architecture: {str(e).splitlines()[0]}") from None
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.start_epoch = int(state["epoch"])
    run.best = json.loads(state["best"]) if state.get("best") else None
    run.history = json.loads(state.get("history", "[]"))
    run.elapsed = float(state.get("elapsed_s", 0.0))
    _set_rng_state(state["rng"])
    # A schedule extended by a larger --epochs follows the recipe now in force.
    run.scheduler.lr_lambdas[0] = lambda e: lr_factor(recipe, e)
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(recipe, run.start_epoch)
    if run.start_epoch >= recipe.epochs:
        raise TrainingError(f"{resume}: already trained {run.start_epoch} epochs; pass a larger --epochs to continue")


def _make_loader(recipe: Recipe, data: ReIDData, device: torch.device, workers: int, rank: int, world: int, show: bool):
    """(P x K sampler, loader) over the training images, decoded into memory first when they fit."""
    images = TrainImages(
        data.train,
        recipe.input_size,
        TrainTransform(IMAGENET_MEAN, IMAGENET_STD, recipe.flip_p, recipe.pad, recipe.erase_p),
        preload=False,
    )
    if len(data.train) * recipe.input_size[0] * recipe.input_size[1] * 3 <= PRELOAD_LIMIT_BYTES:
        for i in progress(range(len(images)), desc="decode", unit="img", enabled=show, leave=False):
            images.pixels(i)
    sampler = PKBatchSampler(images.labels, recipe.batch_p, recipe.batch_k, seed=recipe.seed, rank=rank, world_size=world)
    loader = torch.utils.data.DataLoader(
        images,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    return sampler, loader


def _memory_format(recipe: Recipe) -> torch.memory_format:
    return torch.channels_last if recipe.channels_last else torch.contiguous_format


def prepare_run(recipe: Recipe, data: ReIDData, opts: RunOptions, resume: str | None = None) -> Run:
    """Device and process group, network, optimiser and schedule, resumed state, data loader."""
    world, rank, local_rank = _distributed()
    device = _set_up_device(opts, world, local_rank)
    precision = _precision_for(opts, device)
    state = read_state(resume) if resume else None

    torch.manual_seed(recipe.seed)  # same initial weights on every rank
    random.seed(recipe.seed + rank)
    np.random.seed(recipe.seed + rank)
    model = build_network(recipe, data.num_train_ids, None if state else opts.imagenet_weights)
    net = TrainingNet(model, recipe, data.num_train_ids).to(device, memory_format=_memory_format(recipe))
    torch.manual_seed(recipe.seed + 7919 * rank)  # augmentation: each rank its own stream
    optimizer = make_optimizer(recipe, net.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(recipe, e))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    workers = default_workers() if opts.workers is None else opts.workers
    out = Path(opts.out)
    state_path, log_path = side_paths(out)
    training_meta = {
        "recipe": recipe.to_dict(),
        "data": str(Path(data.root).resolve()),
        "counts": data.counts(),
        "device": str(device),
        "world_size": world,
        "amp": precision != "fp32",
        "precision": precision,
        "imagenet_weights": opts.imagenet_weights,
        "torch": torch.__version__,
    }
    run = Run(
        recipe, data, opts, device, world, rank, precision, model, net, net, optimizer, scheduler, scaler,
        None, None, workers, out, state_path, log_path, training_meta,
    )
    if state is not None:
        _restore(run, state, resume)
    run.sampler, run.loader = _make_loader(recipe, data, device, workers, rank, world, opts.progress and run.is_main)
    if world > 1:
        run.train_net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if run.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        if state is None and log_path.exists():
            log_path.unlink()
    return run


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward (in the run's precision), backward, optimiser step; returns the loss and its parts."""
    images = images.to(run.device, non_blocking=True, memory_format=_memory_format(run.recipe))
    labels = labels.to(run.device, non_blocking=True)
    with autocast(run.precision, run.device.type):
        total, parts = run.train_net(images, labels)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return total.detach(), {k: v.detach() for k, v in parts.items()}


def train_epoch(run: Run, epoch: int) -> dict:
    """One pass over the P x K batches, then one scheduler step; returns the epoch's log record."""
    run.sampler.set_epoch(epoch)
    run.train_net.train()
    t0 = time.time()
    sums: dict[str, float] = {}
    seen, steps = 0, 0
    show = run.opts.progress and run.is_main
    bar = progress(run.loader, desc=f"epoch {epoch + 1}/{run.recipe.epochs}", unit="batch", enabled=show, leave=False)
    for images, labels in bar:
        total, parts = train_step(run, images, labels)
        if not math.isfinite(float(total)):
            raise TrainingError(f"loss became {float(total)} at epoch {epoch + 1}; lower --lr")
        steps += 1
        seen += len(images)
        sums["loss"] = sums.get("loss", 0.0) + float(total)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}", ips=f"{seen / (time.time() - t0):.0f}")
    epoch_time = time.time() - t0
    run.elapsed += epoch_time
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    return {
        "epoch": epoch + 1,
        **{k: round(v / max(steps, 1), 5) for k, v in sums.items()},
        "lr": lr,
        "img_per_s": round(seen * run.world / epoch_time, 2),
        "time_s": round(epoch_time, 2),
        "precision": run.precision,
    }


def evaluate(run: Run, epoch: int) -> dict:
    """Rank-1/mAP of the serving network on query/gallery (fp32, as served)."""
    metrics, _ = evaluate_model(
        run.model, run.data, IMAGENET_MEAN, IMAGENET_STD, run.device, batch_size=run.opts.eval_batch_size, workers=run.workers
    )
    return {"epoch": epoch, **metrics}


def evaluate_and_keep_best(run: Run, epoch: int) -> dict:
    """Evaluate after ``epoch`` epochs; a better mAP than the best so far writes the checkpoint."""
    run.last_eval = evaluate(run, epoch)
    # A run resumed into another --out has no checkpoint there yet: its first evaluation writes one.
    if run.best is None or run.last_eval["mAP"] > run.best["mAP"] or not run.out.exists():
        run.best = run.last_eval
        meta = {**run.training_meta, "epochs": epoch, "best_epoch": epoch, "train_time_s": round(run.elapsed, 1)}
        save_checkpoint(run.model, run.out, training=meta, metrics=run.best)
    return run.last_eval


def save_state(run: Run, epoch: int) -> None:
    """Everything --resume needs after ``epoch`` epochs, written atomically."""
    _atomic_torch_save(
        {
            "state_version": STATE_VERSION,
            "net": run.net.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "epoch": epoch,
            "num_classes": run.data.num_train_ids,
            "recipe": json.dumps(run.recipe.to_dict()),
            "best": json.dumps(run.best) if run.best else "",
            "history": json.dumps(run.history),
            "elapsed_s": run.elapsed,
            "rng": _rng_state(),
        },
        run.state_path,
    )


def _log(run: Run, record: dict) -> None:
    with open(run.log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _due_for_eval(recipe: Recipe, epochs_done: int) -> bool:
    return epochs_done == recipe.epochs or (recipe.eval_every > 0 and epochs_done % recipe.eval_every == 0)


def _finish_epoch(run: Run, record: dict) -> None:
    """Rank 0 after each epoch: evaluate when due, log, print the progress line, save the state."""
    epoch = record["epoch"]
    if _due_for_eval(run.recipe, epoch):
        record["eval"] = evaluate_and_keep_best(run, epoch)
    run.history.append(record)
    _log(run, record)
    msg = f"epoch {epoch}/{run.recipe.epochs} loss {record['loss']:.4f} lr {record['lr']:.2e} {record['img_per_s']:.1f} img/s"
    if "eval" in record:
        msg += f" | mAP {record['eval']['mAP']:.4f} rank1 {record['eval']['rank1']:.4f}"
    tqdm.write(msg)
    save_state(run, epoch)


def train(recipe: Recipe, data: ReIDData, opts: RunOptions, resume: str | None = None) -> dict:
    """Train, evaluate and write the files; returns a summary (best metrics, paths, timings)."""
    run = prepare_run(recipe, data, opts, resume)
    if opts.eval_at_start and resume is None and run.is_main:
        run.untrained = evaluate(run, 0)
        run.training_meta["untrained_metrics"] = run.untrained
        _log(run, {"epoch": 0, "eval": run.untrained})
    for epoch in range(run.start_epoch, recipe.epochs):
        record = train_epoch(run, epoch)
        if run.is_main:
            _finish_epoch(run, record)
    if run.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    calibration = None
    if run.is_main and run.best is not None:
        calibration = _calibrate(run.out, data, run.device, opts.eval_batch_size, run.workers)
    return {
        "out": str(run.out),
        "state": str(run.state_path),
        "log": str(run.log_path),
        "best": run.best,
        "last": run.last_eval,
        "untrained": run.untrained,
        "train_time_s": round(run.elapsed, 1),
        "img_per_s": run.history[-1]["img_per_s"] if run.history else None,
        "calibration": calibration,
        "precision": run.precision,
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
