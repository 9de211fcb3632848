"""Does the graph-free CNN inherit MGAT's refinement? Score both on held-out data.

At test time the gallery's identities are known (they were enrolled), so MGAT's update can
be computed over the gallery: X'_g = (A * M) X_g W with M from the gallery's identities
and W the trained layer's projection. Queries stay unrefined: a query's identity is what
is being asked, so no mask can be built for it. Distractors (pid 0) are nobody's identity:
each is its own singleton in the mask. The graph is the whole gallery, far larger than a
P x K training batch, so the attention spreads over more nodes than in training.

``refinement_metrics`` returns the ranking figures of the CNN's own embedding and of the
refined gallery (same queries), and MSE(X_g, X'_g): the test-time counterpart of the OF
loss logged per training epoch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.mgat import refine
from training.data import EvalImages, ReIDData, Sample
from training.embeddings import cosine_distances, ranking_metrics


def enrollment_labels(pids: np.ndarray) -> torch.Tensor:
    """Mask labels for a gallery: its person ids, each distractor (pid 0) a label of its own."""
    pids = np.asarray(pids, dtype=np.int64).copy()
    distractors = np.flatnonzero(pids == 0)
    pids[distractors] = -1 - np.arange(len(distractors))  # person ids are positive: no clash
    return torch.from_numpy(pids)


@torch.no_grad()
def raw_embeddings(model: nn.Module, samples: list[Sample], mean, std, device, batch_size: int = 64) -> torch.Tensor:
    """N x D embeddings as the network outputs them, not normalised (MGAT works on these)."""
    loader = torch.utils.data.DataLoader(EvalImages(samples, model.input_size, mean, std), batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        out = [model(images.to(device)).float().cpu() for images in loader]
    finally:
        model.train(was_training)
    return torch.cat(out)


def refinement_metrics(
    model: nn.Module, gamma: float, weight: torch.Tensor | None, data: ReIDData, mean, std, device, batch_size: int = 64
) -> dict:
    """{"cnn": metrics, "refined": metrics, "gallery_mse": MSE(X_g, X'_g)} on data's query/gallery."""
    q = raw_embeddings(model, data.query, mean, std, device, batch_size)
    g = raw_embeddings(model, data.gallery, mean, std, device, batch_size)
    labels = enrollment_labels(np.array([s.pid for s in data.gallery]))
    g_refined = refine(g, labels, gamma, None if weight is None else weight.detach().cpu().float())
    qn = F.normalize(q, dim=1)
    return {
        "cnn": ranking_metrics(cosine_distances(qn, F.normalize(g, dim=1)), data.query, data.gallery),
        "refined": ranking_metrics(cosine_distances(qn, F.normalize(g_refined, dim=1)), data.query, data.gallery),
        "gallery_mse": float(F.mse_loss(g, g_refined)),
    }
