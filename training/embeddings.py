"""Embed query and gallery with a model and score the ranking (cosine distance, Market-1501 protocol)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models import embed
from training.data import EvalImages, ReIDData, Sample
from training.evaluate import cmc_map


@torch.no_grad()
def extract(
    model: nn.Module,
    samples: list[Sample],
    mean,
    std,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    progress=None,
) -> torch.Tensor:
    """N x D L2-normalised embeddings on the CPU, inputs prepared exactly as the service prepares them."""
    loader = torch.utils.data.DataLoader(
        EvalImages(samples, model.input_size, mean, std), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    out = []
    for images in loader:
        out.append(embed(model, images.to(device, non_blocking=True)).cpu())
        if progress is not None:
            progress.update(len(images))
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "embedding_dim", 0))


def query_gallery_similarity(
    model: nn.Module, data: ReIDData, mean, std, device, batch_size: int = 64, workers: int = 0, progress=None
) -> np.ndarray:
    """Q x G cosine similarities of ``data``'s query and gallery, for a model in eval mode."""
    q = extract(model, data.query, mean, std, device, batch_size, workers, progress)
    g = extract(model, data.gallery, mean, std, device, batch_size, workers, progress)
    return (q @ g.t()).numpy()


def query_gallery_labels(data: ReIDData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(q_pids, g_pids, q_camids, g_camids): the label arguments of cmc_map, in its order."""
    return (
        np.array([s.pid for s in data.query]), np.array([s.pid for s in data.gallery]),
        np.array([s.camid for s in data.query]), np.array([s.camid for s in data.gallery]),
    )


def cosine_distances(queries: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
    """1 - cosine similarity of L2-normalised rows."""
    return (1.0 - queries @ gallery.t()).numpy()


def ranking_metrics(distmat: np.ndarray, query: list[Sample], gallery: list[Sample]) -> dict:
    """rank1/5/10, mAP and mINP as fractions."""
    result = cmc_map(
        distmat,
        np.array([s.pid for s in query]),
        np.array([s.pid for s in gallery]),
        np.array([s.camid for s in query]),
        np.array([s.camid for s in gallery]),
        max_rank=10,
    )
    cmc = result["cmc"]
    return {
        "rank1": float(cmc[0]),
        "rank5": float(cmc[4]),
        "rank10": float(cmc[9]),
        "mAP": float(result["mAP"]),
        "mINP": float(result["mINP"]),
    }


def evaluate_model(
    model: nn.Module, data: ReIDData, mean, std, device, batch_size: int = 64, workers: int = 0, progress=None
) -> tuple[dict, np.ndarray]:
    """(metrics, query x gallery cosine distances) for a model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        q = extract(model, data.query, mean, std, device, batch_size, workers, progress)
        g = extract(model, data.gallery, mean, std, device, batch_size, workers, progress)
    finally:
        model.train(was_training)
    distmat = cosine_distances(q, g)
    return ranking_metrics(distmat, data.query, data.gallery), distmat
