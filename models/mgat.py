"""MGAT: Masked Graph Attention (Bao et al., CVPR 2019 workshops), a training-time layer.

A P x K batch of CNN embeddings X (N x d) is a complete graph. For nodes i, j:

    e_ij = ||x_i - x_j||_2                      (self-edges included, e_ii = 0)
    a_ij = exp(-gamma * e_ij / s)               shorter edge -> more attention
    A_ij = a_ij / sum_j a_ij                    L1 row normalisation (= a row softmax of -gamma e / s)
    M_ij = +1 if y_i == y_j else -1             for a P x K batch: floor(i/K) == floor(j/K)
    X'   = (A * M) X W                          d' = d, W initialised to the identity

X' is supervised by its own identity classifier (cross-entropy), and the
optimisation-feedback (OF) loss, MSE(X, X'), carries what MGAT learned back into the CNN
so that at test time the CNN alone gives the refined embedding and no graph is built.

Which reading of the paper this is, and why (the formula images are lost from the notes):

* Attention: exp(-gamma * e) read literally, then L1-normalised per row. The notes say
  gamma maps attention "into a small range near zero"; we divide the distances by ``s``,
  the batch's mean off-diagonal distance (no gradient), so one gamma means the same
  sharpness whatever the feature scale (it grows during training and differs by arch).
  Computed as a softmax, which is the same function and cannot overflow.
* Mask: from the labels (equal labels -> +1), which is the paper's floor(i/K) rule for a
  P x K batch and stays right for any batch order.
* The mask multiplies the normalised attention, as in the notes (they remark that the
  negative mask breaks the normalisation on purpose: it acts like a weight decay).
* OF loss: X' is detached, so the loss moves the CNN's features towards the refined ones
  and never the refined ones back towards the CNN. Without the detach the cheapest way
  to lower it is W -> something that undoes the graph update, which feeds nothing back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """N x N Euclidean distances, exactly 0 on the diagonal, with a finite gradient there."""
    sq = x.pow(2).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.t()
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    # sqrt has an infinite derivative at 0, reached on the diagonal and between duplicate
    # features (a P x K sampler repeats images of identities with fewer than K): the clamp
    # gives those entries a zero gradient instead of NaN.
    tiny = 1e-12
    return torch.where(eye | (d2 <= tiny), torch.zeros_like(d2), d2.clamp_min(tiny).sqrt())


def attention_matrix(x: torch.Tensor, gamma: float, scale_invariant: bool = True) -> torch.Tensor:
    """Row-L1-normalised exp(-gamma * e_ij [/ mean off-diagonal e]) over the batch graph."""
    e = pairwise_distances(x)
    if scale_invariant and x.shape[0] > 1:
        n = x.shape[0]
        mean_edge = e.detach().sum() / (n * (n - 1))
        e = e / mean_edge.clamp_min(1e-12)
    return torch.softmax(-gamma * e, dim=1)


def identity_mask(labels: torch.Tensor) -> torch.Tensor:
    """M_ij = +1 where nodes i and j share an identity, -1 otherwise."""
    same = labels[:, None] == labels[None, :]
    return same.float() * 2.0 - 1.0


def pk_mask(num_identities: int, images_per_identity: int) -> torch.Tensor:
    """The paper's mask for a P x K batch: +1 where floor(i/K) == floor(j/K)."""
    groups = torch.arange(num_identities * images_per_identity) // images_per_identity
    return identity_mask(groups)


def masked_graph_update(x: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """X' = (A * M) X, before the optional learnable projection."""
    return (attention_matrix(x, gamma) * identity_mask(labels)) @ x


def refine(x: torch.Tensor, labels: torch.Tensor, gamma: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """X' = (A * M) X W over any labelled set: a training batch, or at test time an enrolled
    gallery whose identities are known (``weight`` None: no projection)."""
    refined = masked_graph_update(x, labels, gamma)
    return refined @ weight if weight is not None else refined


def of_loss(features: torch.Tensor, refined: torch.Tensor, detach_refined: bool = True) -> torch.Tensor:
    """Optimisation-feedback loss: mean squared error between the CNN features and MGAT's output."""
    target = refined.detach() if detach_refined else refined
    return F.mse_loss(features, target)


class MGAT(nn.Module):
    """The masked graph attention layer with its identity classifier (training only).

    ``forward(x, labels)`` returns ``(refined, logits)``; ``logits`` is None without classes.
    """

    def __init__(self, dim: int, num_classes: int = 0, gamma: float = 1.0, learnable_weight: bool = True):
        super().__init__()
        self.gamma = gamma
        self.weight = nn.Parameter(torch.eye(dim)) if learnable_weight else None
        if num_classes > 0:
            # BNNeck-style head, like the CNN's own: BN without shift, then a bias-free classifier.
            self.bn = nn.BatchNorm1d(dim)
            self.bn.bias.requires_grad_(False)
            self.classifier = nn.Linear(dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)
        else:
            self.bn = self.classifier = None

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        refined = refine(x, labels, self.gamma, self.weight)
        logits = self.classifier(self.bn(refined)) if self.classifier is not None else None
        return refined, logits
