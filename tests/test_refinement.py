"""Test-time refinement of an enrolled gallery (training/refinement.py)."""

import numpy as np

from training.refinement import enrollment_labels


def test_enrollment_labels_keep_identities_and_make_each_distractor_a_singleton():
    labels = enrollment_labels(np.array([5, 0, 5, 7, 0, 0])).tolist()
    assert labels[0] == labels[2] == 5 and labels[3] == 7
    distractors = [labels[1], labels[4], labels[5]]
    assert len(set(distractors)) == 3 and not set(distractors) & {5, 7}


def test_grouped_refinement_is_the_update_over_each_group_of_identities_alone():
    import torch

    from models.mgat import refine
    from training.refinement import refine_in_groups

    torch.manual_seed(0)
    x = torch.randn(12, 4)
    labels = torch.tensor([1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6])
    out = refine_in_groups(x, labels, gamma=1.0, weight=None, identities_per_group=3)
    first, second = labels <= 3, labels > 3
    assert torch.allclose(out[first], refine(x[first], labels[first], 1.0))
    assert torch.allclose(out[second], refine(x[second], labels[second], 1.0))
    # One group holding everything is the whole-gallery update.
    assert torch.allclose(refine_in_groups(x, labels, 1.0, None, identities_per_group=6), refine(x, labels, 1.0))
