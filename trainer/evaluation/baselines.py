"""Non-learned baselines that score the same query rows as a model, so the same metrics apply.

A learned cold-start model is only worth its cost if it beats these under the per-task metrics
of gmeta.trainer.evaluation.metrics: a constant (chance by the tie rule), the smoothed item mean (item
popularity for clicks, mean rating for ratings) and item-kNN on the task's support set (what
co-occurrence in the training split knows about the user's items).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


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


@dataclass(frozen=True)
class ItemKNNBaseline:
    """Item-based nearest neighbours on the support set: the neighbourhood method a recommender
    engineer tries first, with no training.

    Fitted once on the training split's positive rows: ``X`` is training task x item (1 where the
    task's user liked the item), the similarity of items i and j is the cosine of their columns,
    ``|users(i) & users(j)| / sqrt(|users(i)| |users(j)|)``. A query row's score is the sum of
    its item's similarities to the task's support positives (itself excluded), so it needs the
    support set; items never liked in training score 0. Scoring is a sparse product per chunk of
    tasks (vectorized; memory bounded by the chunk, not by tasks x items).
    """

    items: np.ndarray       # sorted unique item ids liked in training
    cooccurrence: object    # scipy.sparse CSR [items, items]: training tasks that liked both
    inv_sqrt_count: np.ndarray  # 1 / sqrt(training tasks that liked the item), aligned with `items`
    chunk_tasks: int = 4096

    @classmethod
    def fit(cls, task_ids, item_ids, relevant) -> "ItemKNNBaseline":
        task_ids, item_ids = np.asarray(task_ids).ravel(), np.asarray(item_ids).ravel()
        relevant = np.asarray(relevant).ravel() > 0.5
        if not (task_ids.size == item_ids.size == relevant.size):
            raise ValueError(f"{task_ids.size} task ids, {item_ids.size} item ids, {relevant.size} labels")
        if not relevant.any():
            raise ValueError("no positive training rows to fit the item-kNN baseline on")
        _, task_index = np.unique(task_ids[relevant], return_inverse=True)
        items, item_index = np.unique(item_ids[relevant], return_inverse=True)
        liked = sp.csr_matrix((np.ones(item_index.size), (task_index, item_index)),
                              shape=(task_index.max() + 1, items.size))
        liked.data[:] = 1.0                                   # a task that liked an item twice counts once
        count = np.asarray(liked.sum(axis=0)).ravel()
        return cls(items=items, cooccurrence=(liked.T @ liked).tocsr(),
                   inv_sqrt_count=1.0 / np.sqrt(count))

    def scores(self, query_tasks, query_items, support_tasks, support_items) -> np.ndarray:
        """One score per query row: the sum of cosine similarities of its item to the support
        positives (``support_tasks`` / ``support_items``: the positive support rows) of its task."""
        query_tasks, query_items = np.asarray(query_tasks).ravel(), np.asarray(query_items).ravel()
        support_tasks, support_items = np.asarray(support_tasks).ravel(), np.asarray(support_items).ravel()
        out = np.zeros(query_tasks.size)
        q_col, q_known = self._columns(query_items)
        s_col, s_known = self._columns(support_items)
        tasks, q_task = np.unique(query_tasks, return_inverse=True)
        s_pos = np.searchsorted(tasks, support_tasks)
        s_ok = s_known & (s_pos < tasks.size) & (tasks[np.minimum(s_pos, tasks.size - 1)] == support_tasks)
        s_task, s_col = s_pos[s_ok], s_col[s_ok]
        for lo in range(0, tasks.size, self.chunk_tasks):
            hi = min(lo + self.chunk_tasks, tasks.size)
            sel = (s_task >= lo) & (s_task < hi)
            support = sp.csr_matrix((self.inv_sqrt_count[s_col[sel]], (s_task[sel] - lo, s_col[sel])),
                                    shape=(hi - lo, self.items.size))
            support.data[:] = self.inv_sqrt_count[support.indices]   # a repeated support item counts once
            total = (support @ self.cooccurrence).tocsr()           # [tasks, items], unnormalised sums
            rows = np.flatnonzero(q_known & (q_task >= lo) & (q_task < hi))
            t, c = q_task[rows] - lo, q_col[rows]
            raw = np.asarray(total[t, c]).ravel()
            own = np.asarray(support[t, c]).ravel() * self.cooccurrence.diagonal()[c]   # j == i
            out[rows] = (raw - own) * self.inv_sqrt_count[c]
        return out

    def _columns(self, item_ids: np.ndarray) -> tuple:
        slot = np.minimum(np.searchsorted(self.items, item_ids), self.items.size - 1)
        return slot, self.items[slot] == item_ids
