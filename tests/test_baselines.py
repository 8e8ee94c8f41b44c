"""Non-learned baselines: hand-computed item means, and that the per-task metrics rank them honestly."""

import numpy as np
import pytest

from gmeta.trainer.baselines import ItemMeanBaseline, constant_scores
from gmeta.trainer.metrics import evaluate_scores, paired_difference, per_task_metrics


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
