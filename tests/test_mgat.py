"""MGAT against a 4-node example worked out by hand, and the properties training relies on."""

import math

import pytest
import torch

from models.mgat import (
    MGAT,
    attention_matrix,
    identity_mask,
    masked_graph_update,
    of_loss,
    pairwise_distances,
    pk_mask,
    refine,
)

# Four nodes in 2-D, P = 2 identities x K = 2 images: nodes 0, 1 are identity 0; 2, 3 identity 1.
# They sit on the corners of a 3 x 4 rectangle, so every distance is 3, 4 or 5:
#   e = [[0, 3, 4, 5],
#        [3, 0, 5, 4],
#        [4, 5, 0, 3],
#        [5, 4, 3, 0]]
# The mean off-diagonal edge is s = (3+4+5) / 3 = 4. With gamma = 4 ln 2 the scale-invariant
# attention is exp(-4 ln2 * e / 4) = 2^-e: 1, 1/8, 1/16, 1/32 for e = 0, 3, 4, 5. Row 0 is
# [1, 1/8, 1/16, 1/32] = [32, 4, 2, 1] / 32, which sums to 39/32, so A[0] = [32, 4, 2, 1] / 39.
X = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [3.0, 4.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1, 1])
GAMMA = 4 * math.log(2)
E = torch.tensor([[0, 3, 4, 5], [3, 0, 5, 4], [4, 5, 0, 3], [5, 4, 3, 0]], dtype=torch.float64)
A = torch.tensor([[32, 4, 2, 1], [4, 32, 1, 2], [2, 1, 32, 4], [1, 2, 4, 32]], dtype=torch.float64) / 39
M = torch.tensor([[1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]], dtype=torch.float64)
# X' = (A * M) X, row 0: (32*(0,0) + 4*(3,0) - 2*(0,4) - 1*(3,4)) / 39 = (9, -12) / 39, and so on.
X_REFINED = torch.tensor([[9, -12], [90, -12], [9, 144], [90, 144]], dtype=torch.float64) / 39


def test_distances_match_the_hand_computed_edges():
    assert torch.allclose(pairwise_distances(X), E, atol=1e-12)


def test_attention_matches_the_hand_computed_example():
    assert torch.allclose(attention_matrix(X, GAMMA), A, atol=1e-12)
    # Without the scale normalisation the same numbers need gamma = ln 2 (e is not divided by s = 4).
    assert torch.allclose(attention_matrix(X, math.log(2), scale_invariant=False), A, atol=1e-12)


def test_attention_rows_are_l1_normalised_and_scale_invariant():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = attention_matrix(x, gamma=2.0)
    assert (a > 0).all()
    assert torch.allclose(a.sum(dim=1), torch.ones(8, dtype=torch.float64))
    assert torch.equal(a.argmax(dim=1), torch.arange(8)), "a node attends most to itself (e_ii = 0)"
    assert torch.allclose(attention_matrix(37.0 * x, gamma=2.0), a, atol=1e-12)
    assert not torch.allclose(attention_matrix(37.0 * x, gamma=2.0, scale_invariant=False), a, atol=1e-3)


def test_mask_matches_the_hand_computed_example():
    assert torch.equal(identity_mask(LABELS), M.float())
    assert torch.equal(pk_mask(2, 2), M.float())


@pytest.mark.parametrize("p, k", [(1, 4), (3, 2), (4, 4), (16, 4)])
def test_pk_mask_equals_identity_mask_for_a_p_by_k_batch(p, k):
    labels = torch.arange(p).repeat_interleave(k) * 7 + 100  # any label values, P x K order
    assert torch.equal(pk_mask(p, k), identity_mask(labels))


def test_node_update_is_the_masked_attention_times_x():
    assert torch.allclose(masked_graph_update(X, LABELS, GAMMA), X_REFINED, atol=1e-12)
    assert torch.allclose(X_REFINED, (A * M) @ X, atol=1e-12)


def test_layer_applies_its_weight_after_the_graph_update():
    layer = MGAT(2, gamma=GAMMA).double()
    refined, logits = layer(X, LABELS)
    assert logits is None
    assert torch.allclose(refined, X_REFINED, atol=1e-12), "W starts as the identity"
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, -1.0]]))
    refined, _ = layer(X, LABELS)
    assert torch.allclose(refined, X_REFINED @ layer.weight, atol=1e-12)


def test_layer_with_classes_gives_identity_logits():
    layer = MGAT(16, num_classes=5, gamma=1.0).train()
    x = torch.randn(8, 16)
    refined, logits = layer(x, torch.arange(4).repeat_interleave(2))
    assert refined.shape == (8, 16) and logits.shape == (8, 5)


def test_of_loss_is_the_mean_squared_error():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    refined = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # differences 1, 2, 2, 3 -> squares 1, 4, 4, 9 -> mean 4.5
    assert of_loss(features, refined).item() == pytest.approx(4.5)
    assert of_loss(refined, refined).item() == 0.0


def test_of_loss_sends_no_gradient_to_the_refined_side():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    labels = torch.arange(4).repeat_interleave(2)
    layer = MGAT(6, gamma=1.0)
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn(6, 6))
    refined, _ = layer(x, labels)
    of_loss(x, refined).backward()
    assert layer.weight.grad is None, "the OF loss must not train MGAT"
    # The CNN side gets exactly the direct MSE gradient, 2 (x - x') / numel, nothing through x'.
    assert torch.allclose(x.grad, 2 * (x - refined).detach() / x.numel(), atol=1e-6)

    # Without the detach the gradient does reach W: the switch does what it says.
    x.grad = None
    refined, _ = layer(x, labels)
    of_loss(x, refined, detach_refined=False).backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_gradient_through_distances_is_finite_on_the_diagonal_and_for_duplicates():
    # Nodes 0 and 1 are identical: a P x K sampler repeats images of identities with fewer than K.
    x = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [0.0, 1.0, -1.0], [2.0, 0.0, 1.0]], requires_grad=True)
    d = pairwise_distances(x)
    assert torch.equal(d.diagonal(), torch.zeros(4)) and d[0, 1] == 0
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    # Off the zero entries the gradient is the true one (that of torch.cdist on distinct points).
    y = x.detach()[1:].clone().requires_grad_(True)
    torch.cdist(y, y).sum().backward()
    z = x.detach()[1:].clone().requires_grad_(True)
    pairwise_distances(z).sum().backward()
    assert torch.allclose(z.grad, y.grad, atol=1e-5)

    x.grad = None
    layer = MGAT(3, num_classes=2, gamma=1.0)
    refined, logits = layer(x, torch.tensor([0, 0, 1, 1]))
    (torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 1, 1])) + of_loss(x, refined)).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_refine_applies_the_weight_after_the_hand_computed_update():
    w = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(refine(X, LABELS, GAMMA, w), X_REFINED @ w)
    assert torch.allclose(refine(X, LABELS, GAMMA), X_REFINED)


def test_refine_with_a_very_sharp_graph_leaves_every_node_to_itself():
    # Distinct nodes, each its own identity: attention concentrates on the self-edge as gamma grows.
    x = torch.randn(6, 5, dtype=torch.float64)
    w = torch.randn(5, 5, dtype=torch.float64)
    assert torch.allclose(refine(x, torch.arange(6), gamma=200.0, weight=w), x @ w, atol=1e-9)


def test_refine_of_one_identity_with_a_flat_graph_is_its_mean():
    x = torch.randn(5, 3, dtype=torch.float64)
    refined = refine(x, torch.zeros(5, dtype=torch.long), gamma=0.0)
    assert torch.allclose(refined, x.mean(dim=0).expand(5, 3))


def test_refine_follows_a_reordering_of_the_gallery():
    x = torch.randn(7, 4, dtype=torch.float64)
    labels = torch.tensor([3, 1, 3, 2, 1, 2, 3])
    perm = torch.randperm(7)
    assert torch.allclose(refine(x, labels, 1.0)[perm], refine(x[perm], labels[perm], 1.0))
