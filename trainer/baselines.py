"""Non-learned baselines that score the same query rows as a model, so the same metrics apply.

A learned cold-start model is only worth its cost if it beats these under the per-task metrics
of gmeta.trainer.metrics: a constant (chance by the tie rule) and the smoothed item mean
(item popularity for clicks, mean rating for ratings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def constant_scores(n: int, value: float = 0.5) -> np.ndarray:
    """n equal scores: every per-task AUC is exactly 0.5 and nDCG/MRR their random-order value."""
    return np.full(int(n), float(value), dtype=np.float64)


@dataclass(frozen=True)
class ItemMeanBaseline:
    """Per item, the mean training label shrunk towards the global mean.

    score(item) = (sum of its labels + prior_weight * global_mean) / (its rows + prior_weight),
    so rarely seen items do not get extreme scores; unseen items get the global mean. Labels are
    used as given: clicks give a smoothed CTR (popularity), ratings a smoothed mean rating.
    Item ids may be huge or hashed: the table is sorted unique ids, looked up by binary search.
    """

    items: np.ndarray  # sorted unique item ids seen in training
    means: np.ndarray  # smoothed mean label per item, aligned with `items`
    global_mean: float
    prior_weight: float

    @classmethod
    def fit(cls, item_ids, labels, prior_weight: float = 10.0) -> "ItemMeanBaseline":
        item_ids = np.asarray(item_ids).ravel()
        labels = np.asarray(labels, dtype=np.float64).ravel()
        if item_ids.size != labels.size:
            raise ValueError(f"{item_ids.size} item ids but {labels.size} labels")
        if item_ids.size == 0:
            raise ValueError("no training rows to fit the item means on")
        if prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
        items, index = np.unique(item_ids, return_inverse=True)
        label_sum = np.bincount(index, weights=labels, minlength=items.size)
        rows = np.bincount(index, minlength=items.size)
        global_mean = float(labels.mean())
        means = (label_sum + prior_weight * global_mean) / (rows + prior_weight)
        return cls(items=items, means=means, global_mean=global_mean, prior_weight=float(prior_weight))

    def scores(self, item_ids) -> np.ndarray:
        """Smoothed item mean per row; the global mean for items not seen in training."""
        item_ids = np.asarray(item_ids).ravel()
        slot = np.minimum(np.searchsorted(self.items, item_ids), self.items.size - 1)
        seen = self.items[slot] == item_ids
        return np.where(seen, self.means[slot], self.global_mean)
