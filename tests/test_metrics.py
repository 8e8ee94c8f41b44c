"""AUC against values worked out by hand."""

import math

from gmeta.trainer.metrics import auc


def test_auc_perfect_and_inverted():
    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_auc_counts_ties_as_half():
    # pairs (pos, neg): (0.5 vs 0.5) tie -> 0.5, (0.5 vs 0.1) -> 1, (0.9 vs both) -> 2  => 3.5 / 4
    assert auc([0.5, 0.9, 0.5, 0.1], [1, 1, 0, 0]) == 3.5 / 4


def test_auc_single_class_is_nan():
    assert math.isnan(auc([0.1, 0.2], [1, 1]))
