"""Losses on small cases computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.mgat import MGAT
from training.losses import batch_hard_triplet, cross_entropy_smooth, mgat_losses


def test_uniform_logits_cost_log_num_classes_whatever_the_smoothing():
    logits = torch.zeros(3, 4)
    targets = torch.tensor([0, 1, 3])
    for eps in (0.0, 0.1, 0.5):
        assert cross_entropy_smooth(logits, targets, eps).item() == pytest.approx(math.log(4), abs=1e-6)


def test_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.0]])
    z = math.log(math.exp(2) + 1)
    log_p = [2 - z, -z]
    eps = 0.2
    expected = -((1 - eps + eps / 2) * log_p[0] + (eps / 2) * log_p[1])
    assert cross_entropy_smooth(logits, torch.tensor([0]), eps).item() == pytest.approx(expected, rel=1e-6)
    # no smoothing: plain cross-entropy
    assert cross_entropy_smooth(logits, torch.tensor([1]), 0.0).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([1])).item(), rel=1e-6
    )


POINTS = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
LABELS = torch.tensor([0, 0, 1, 1])


def test_batch_hard_triplet_by_hand():
    # anchor: (hardest positive, nearest negative) = 0:(1,3) 1:(1,2) 2:(2,2) 3:(2,4)
    # hinge with margin 0.3: 0, 0, 0.3, 0 -> mean 0.075
    assert batch_hard_triplet(POINTS, LABELS, margin=0.3).item() == pytest.approx(0.075, abs=1e-6)


def test_soft_margin_triplet_by_hand():
    gaps = [1 - 3, 1 - 2, 2 - 2, 2 - 4]
    expected = sum(math.log1p(math.exp(g)) for g in gaps) / 4
    assert batch_hard_triplet(POINTS, LABELS, soft_margin=True).item() == pytest.approx(expected, rel=1e-5)


def test_triplet_ignores_anchors_without_a_positive():
    points = torch.tensor([[0.0], [1.0], [10.0]])
    labels = torch.tensor([0, 0, 1])  # anchor 2 has no positive
    # anchors 0 and 1: positive 1, negative 10 resp. 9 -> hinge 0
    assert batch_hard_triplet(points, labels, margin=0.3).item() == 0.0
    assert batch_hard_triplet(points, labels, margin=9.5).item() == pytest.approx(((1 - 10 + 9.5) + (1 - 9 + 9.5)) / 2)


def test_a_gradient_step_on_the_triplet_loss_lowers_it():
    x = torch.tensor([[0.0], [1.0], [1.5], [3.0]], requires_grad=True)
    before = batch_hard_triplet(x, LABELS, margin=1.0)
    before.backward()
    with torch.no_grad():
        after = batch_hard_triplet(x - 0.1 * x.grad, LABELS, margin=1.0)
    assert before.item() > 0 and after.item() < before.item()


def test_mgat_of_loss_does_not_move_the_refined_side():
    torch.manual_seed(0)
    mgat = MGAT(8, num_classes=3, gamma=1.0)
    feats = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    id_loss, of = mgat_losses(mgat, feats, labels, epsilon=0.1)
    of.backward()
    assert mgat.weight.grad is None  # OF reaches only the CNN features: X' is detached
    assert feats.grad.abs().sum() > 0
    id_loss.backward()
    assert mgat.weight.grad.abs().sum() > 0 and mgat.classifier.weight.grad.abs().sum() > 0
