"""Test-time refinement of an enrolled gallery (training/refinement.py)."""

import numpy as np

from training.refinement import enrollment_labels


def test_enrollment_labels_keep_identities_and_make_each_distractor_a_singleton():
    labels = enrollment_labels(np.array([5, 0, 5, 7, 0, 0])).tolist()
    assert labels[0] == labels[2] == 5 and labels[3] == 7
    distractors = [labels[1], labels[4], labels[5]]
    assert len(set(distractors)) == 3 and not set(distractors) & {5, 7}
