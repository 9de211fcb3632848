"""Does the graph-free CNN inherit MGAT's refinement? Score both on held-out data.

At test time the gallery's identities are known (they were enrolled), so MGAT's update can
be computed over the gallery: X'_g = (A * M) X_g W with M from the gallery's identities
and W the trained layer's projection. Queries stay unrefined: a query's identity is what
is being asked, so no mask can be built for it. Distractors (pid 0) are nobody's identity:
each is its own singleton in the mask. The graph is the whole gallery, far larger than a
P x K training batch, so the attention spreads over more nodes than in training.

M is +1 within an identity and -1 across identities (the paper's mask), so over the whole
gallery the -1 terms (hundreds of other identities) outweigh the few +1 terms and every
refined vector tends to the same minus-the-gallery-mean direction. The graph a training step
sees holds P = 8 identities; the faithful test-time counterpart refines the gallery in
groups of that many identities (``refine_in_groups``). Both are reported: "refined" (whole
gallery) and "refined_in_groups".

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


TRAINING_GRAPH_IDENTITIES = 8  # P of the MGAT recipes' P x K batches


def refine_in_groups(x: torch.Tensor, labels: torch.Tensor, gamma: float, weight: torch.Tensor | None,
                     identities_per_group: int = TRAINING_GRAPH_IDENTITIES) -> torch.Tensor:
    """MGAT's update over graphs of ``identities_per_group`` identities each (all their
    images), the size of a training batch's graph, instead of over the whole gallery."""
    out = torch.empty_like(x if weight is None else x @ weight)
    identities = torch.unique(labels)
    for start in range(0, len(identities), identities_per_group):
        rows = torch.isin(labels, identities[start:start + identities_per_group]).nonzero().squeeze(1)
        out[rows] = refine(x[rows], labels[rows], gamma, weight)
    return out


def refinement_metrics(
    model: nn.Module, gamma: float, weight: torch.Tensor | None, data: ReIDData, mean, std, device, batch_size: int = 64
) -> dict:
    """{"cnn": metrics, "refined": metrics, "gallery_mse": MSE(X_g, X'_g)} on data's query/gallery."""
    q = raw_embeddings(model, data.query, mean, std, device, batch_size)
    g = raw_embeddings(model, data.gallery, mean, std, device, batch_size)
    labels = enrollment_labels(np.array([s.pid for s in data.gallery]))
    weight = None if weight is None else weight.detach().cpu().float()
    g_refined = refine_in_groups(g, labels, gamma, weight)
    g_whole = refine(g, labels, gamma, weight)
    qn = F.normalize(q, dim=1)

    def scores(gallery: torch.Tensor) -> dict:
        return ranking_metrics(cosine_distances(qn, F.normalize(gallery, dim=1)), data.query, data.gallery)

    return {
        "cnn": scores(g),
        "refined": scores(g_whole),
        "refined_in_groups": scores(g_refined),
        "gallery_mse": float(F.mse_loss(g, g_whole)),
    }
