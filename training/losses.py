"""Loss functions: label-smoothed cross-entropy, batch-hard triplet, and the MGAT pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.mgat import MGAT, of_loss, pairwise_distances


def cross_entropy_smooth(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Cross-entropy against (1 - eps) one-hot + eps / num_classes (Szegedy et al. label smoothing)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    num_classes = logits.shape[1]
    target = torch.full_like(log_probs, epsilon / num_classes)
    target.scatter_(1, targets.view(-1, 1), 1.0 - epsilon + epsilon / num_classes)
    return -(target * log_probs).sum(dim=1).mean()


def batch_hard_triplet(
    features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, soft_margin: bool = False
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al.): for each anchor its farthest positive and nearest negative.

    Hinge ``max(0, d_ap - d_an + margin)``, or ``log(1 + exp(d_ap - d_an))`` with ``soft_margin``.
    Anchors that have no positive or no negative in the batch are left out.
    """
    dist = pairwise_distances(features.float())
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    negative = ~same
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not valid.any():
        return features.sum() * 0.0
    hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(dim=1)[valid]
    hardest_neg = dist.masked_fill(~negative, float("inf")).amin(dim=1)[valid]
    gap = hardest_pos - hardest_neg
    return F.softplus(gap).mean() if soft_margin else F.relu(gap + margin).mean()


def mgat_losses(
    mgat: MGAT, features: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1, detach_refined: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(identity loss on MGAT's refined features, OF loss pulling the CNN features to them;
    refined detached unless ``detach_refined=False``)."""
    refined, logits = mgat(features.float(), labels)
    return cross_entropy_smooth(logits, labels, epsilon), of_loss(features.float(), refined, detach_refined)
