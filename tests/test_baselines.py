"""Non-learned baselines: hand-computed item means and item-kNN scores, and that the per-task metrics
rank them honestly."""

import numpy as np
import pytest

from gmeta.trainer.evaluation.baselines import ItemKNNBaseline, ItemMeanBaseline, constant_scores
from gmeta.trainer.evaluation.metrics import evaluate_scores, paired_difference, per_task_metrics


def test_constant_scores_rank_every_task_at_chance():
    task = np.repeat(np.arange(50), 8)
    label = np.random.default_rng(0).random(task.size) < 0.3
    scores = constant_scores(task.size)
    assert scores.shape == (400,) and np.all(scores == scores[0])
    per_task = per_task_metrics(task, scores, label)
    both = np.isfinite(per_task["auc"])
    assert both.sum() > 30 and np.all(per_task["auc"][both] == 0.5)
    report = evaluate_scores(task, scores, label, n_boot=100)
    assert report["gauc"] == {"value": 0.5, "lo": 0.5, "hi": 0.5}
    assert report["pooled_auc"]["value"] == 0.5


def test_constant_scores_ndcg_is_the_random_order_expectation():
    # 4 rows, 1 relevant: the relevant row is in each slot with probability 1/4
    per_task = per_task_metrics([0, 0, 0, 0], constant_scores(4), [0, 1, 0, 0])
    expected = np.mean([1 / np.log2(p + 1) for p in range(1, 5)])
    assert per_task["ndcg@5"][0] == pytest.approx(expected)
    assert per_task["mrr"][0] == pytest.approx(np.mean([1, 1 / 2, 1 / 3, 1 / 4]))


def test_item_mean_by_hand():
    # global mean 2/4 = 0.5; item 7: (2 + 2 * 0.5) / (3 + 2) = 0.6; item 3: (0 + 1) / (1 + 2)
    model = ItemMeanBaseline.fit([7, 7, 7, 3], [1, 0, 1, 0], prior_weight=2.0)
    assert model.global_mean == 0.5
    np.testing.assert_allclose(model.scores([3, 7, 99, 7]), [1 / 3, 0.6, 0.5, 0.6])


def test_item_mean_without_prior_is_the_raw_mean_and_works_for_ratings():
    model = ItemMeanBaseline.fit(["b", "a", "b", "a", "a"], [5.0, 1.0, 3.0, 2.0, 3.0], prior_weight=0.0)
    np.testing.assert_allclose(model.scores(["a", "b", "c"]), [2.0, 4.0, 14.0 / 5])


def test_item_mean_handles_huge_hashed_ids_without_a_dense_table():
    rng = np.random.default_rng(1)
    items = rng.integers(2**62, 2**64 - 1, size=1000, dtype=np.uint64)
    labels = (np.arange(1000) % 2).astype(float)
    model = ItemMeanBaseline.fit(np.concatenate([items, items]), np.concatenate([labels, labels]),
                                 prior_weight=0.0)
    assert model.items.size == 1000  # one entry per distinct id, not per possible id
    np.testing.assert_array_equal(model.scores(items), labels)
    assert model.scores(np.array([12345], dtype=np.uint64))[0] == pytest.approx(0.5)
    # int64 query ids against a uint64 table match exactly (as floats 2**53 and 2**53 + 1 are equal)
    table = ItemMeanBaseline.fit(np.array([2**53 + 1, 5], dtype=np.uint64), [1.0, 0.0], prior_weight=0.0)
    np.testing.assert_array_equal(table.scores(np.array([2**53, 2**53 + 1], dtype=np.int64)), [0.5, 1.0])


def test_item_mean_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        ItemMeanBaseline.fit([1, 2], [1.0])
    with pytest.raises(ValueError, match="no training rows"):
        ItemMeanBaseline.fit([], [])
    with pytest.raises(ValueError, match="prior_weight"):
        ItemMeanBaseline.fit([1], [1.0], prior_weight=-1)


def test_item_mean_beats_constant_when_items_differ_in_click_rate():
    rng = np.random.default_rng(0)
    item_rate = rng.uniform(0.02, 0.6, 200)
    train_items = rng.integers(0, 200, 20_000)
    model = ItemMeanBaseline.fit(train_items, rng.random(20_000) < item_rate[train_items])
    task = np.repeat(np.arange(300), 15)  # cold users: query rows only
    query_items = rng.integers(0, 200, task.size)
    label = rng.random(task.size) < item_rate[query_items]
    popular = per_task_metrics(task, model.scores(query_items), label)
    constant = per_task_metrics(task, constant_scores(task.size), label)
    result = paired_difference(popular, constant, "gauc", n_boot=500)
    assert result["b"] == 0.5 and result["a"] > 0.65
    assert result["significant"] and result["lo"] > 0.1


def test_item_knn_by_hand():
    """Three training users; cosine of item columns; a query row sums its item's similarity to its
    task's support positives, never itself; an item never liked in training scores 0."""
    # liked: user 0 {10, 20}, user 1 {10, 20, 30}, user 2 {30}; the label-0 row of user 2 is ignored
    knn = ItemKNNBaseline.fit([0, 0, 1, 1, 1, 2, 2], [10, 20, 10, 20, 30, 30, 10], [1, 1, 1, 1, 1, 1, 0])
    cos_10_20, cos_10_30 = 2 / np.sqrt(2 * 2), 1 / np.sqrt(2 * 2)
    got = knn.scores(query_tasks=[5, 5, 5, 6], query_items=[10, 30, 99, 20],
                     support_tasks=[5, 5, 5, 6, 7], support_items=[20, 30, 10, 20, 10])
    np.testing.assert_allclose(got, [cos_10_20 + cos_10_30, cos_10_30 + cos_10_30, 0.0, 0.0])


def test_item_knn_matches_brute_force_in_chunks_and_with_huge_ids():
    """Random data: the sparse, chunked scores equal the pairwise definition for any chunk size,
    with 64-bit ids and repeated support items counted once."""
    rng = np.random.default_rng(3)
    ids = rng.integers(2**40, 2**62, 25)
    tasks = np.repeat(np.arange(40), 10)
    items = ids[rng.integers(0, 25, tasks.size)]
    liked_rows = rng.random(tasks.size) < 0.6
    users = {}
    for t, i, r in zip(tasks, items, liked_rows):
        if r:
            users.setdefault(i, set()).add(t)

    def sim(i, j):
        a, b = users.get(i, set()), users.get(j, set())
        return len(a & b) / np.sqrt(len(a) * len(b)) if a and b else 0.0

    q_task, s_task = np.repeat(np.arange(7) + 100, 9), np.repeat(np.arange(7) + 100, 6)
    q_item, s_item = ids[rng.integers(0, 25, q_task.size)], ids[rng.integers(0, 25, s_task.size)]
    want = [sum(sim(i, j) for j in set(s_item[s_task == t]) if j != i) for t, i in zip(q_task, q_item)]
    fitted = ItemKNNBaseline.fit(tasks, items, liked_rows)
    for chunk in (1, 3, 4096):
        knn = ItemKNNBaseline(fitted.items, fitted.cooccurrence, fitted.inv_sqrt_count, chunk_tasks=chunk)
        np.testing.assert_allclose(knn.scores(q_task, q_item, s_task, s_item), want, atol=1e-12)


def test_item_knn_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        ItemKNNBaseline.fit([1, 2], [3, 4], [1])
    with pytest.raises(ValueError, match="no positive"):
        ItemKNNBaseline.fit([1, 2], [3, 4], [0, 0])


def test_item_knn_finds_co_liked_items_popularity_cannot():
    """Two tastes with equally popular items: item-kNN ranks a user's own taste first from the
    support set; the item mean is at chance."""
    rng = np.random.default_rng(0)
    taste = rng.integers(0, 2, 400)
    train_items = np.stack([rng.choice(np.arange(20) + 20 * t, 8, replace=False) for t in taste])
    knn = ItemKNNBaseline.fit(np.repeat(np.arange(400), 8), train_items.ravel(), np.ones(3200))
    mean = ItemMeanBaseline.fit(np.arange(40), np.ones(40))
    cold = rng.integers(0, 2, 100)
    s_item = np.stack([rng.choice(np.arange(20) + 20 * t, 3, replace=False) for t in cold]).ravel()
    q_item = rng.integers(0, 40, (100, 10)).ravel()
    q_task = np.repeat(np.arange(100), 10)
    label = (q_item // 20) == cold[q_task]
    knn_pt = per_task_metrics(q_task, knn.scores(q_task, q_item, np.repeat(np.arange(100), 3), s_item), label,
                              probabilities=False)
    mean_pt = per_task_metrics(q_task, mean.scores(q_item), label)
    result = paired_difference(knn_pt, mean_pt, "gauc", n_boot=200)
    assert result["b"] == 0.5 and result["a"] > 0.95 and result["significant"]
