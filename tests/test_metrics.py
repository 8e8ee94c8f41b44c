"""Metrics against values worked out by hand, brute force over tie orders, and bootstrap behaviour."""

import itertools
import math
import time

import numpy as np
import pytest

from gmeta.trainer.evaluation.metrics import auc, evaluate_scores, paired_difference, per_task_metrics, summarize


def log2_discount(position_1_based):
    return 1.0 / math.log2(position_1_based + 1)


# --------------------------------------------------------------------------- pooled AUC

def test_auc_perfect_and_inverted():
    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_auc_counts_ties_as_half():
    # pairs (pos, neg): (0.5 vs 0.5) tie -> 0.5, (0.5 vs 0.1) -> 1, (0.9 vs both) -> 2  => 3.5 / 4
    assert auc([0.5, 0.9, 0.5, 0.1], [1, 1, 0, 0]) == 3.5 / 4


def test_auc_single_class_is_nan():
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


# --------------------------------------------------------------------------- per-task, by hand

def three_tasks():
    """Task 10: distinct scores; task 20: all tied; task 30: no relevant row. Rows shuffled."""
    rows = [  # (task, score, label)
        (20, 0.4, 1), (10, 0.3, 1), (30, 0.2, 0), (10, 0.9, 1), (20, 0.4, 0),
        (10, 0.1, 0), (20, 0.4, 1), (30, 0.7, 0), (10, 0.8, 0), (20, 0.4, 0),
    ]
    task, score, label = (np.array(col) for col in zip(*rows))
    return task, score, label


def test_per_task_metrics_by_hand():
    got = per_task_metrics(*three_tasks())
    np.testing.assert_array_equal(got["task_ids"], [10, 20, 30])
    np.testing.assert_array_equal(got["rows"], [4, 4, 2])
    np.testing.assert_array_equal(got["positives"], [2, 2, 0])

    # task 10, order 0.9(1) 0.8(0) 0.3(1) 0.1(0): correct pairs 2 + 1 of 4
    # task 20, all tied: AUC 0.5; task 30: one class -> NaN
    np.testing.assert_allclose(got["auc"], [0.75, 0.5, np.nan])

    ideal_two = 1 + log2_discount(2)
    ndcg_10 = (1 + log2_discount(3)) / ideal_two
    # all four slots of task 20 get mean gain 2/4
    ndcg_20 = 0.5 * sum(log2_discount(p) for p in range(1, 5)) / ideal_two
    np.testing.assert_allclose(got["ndcg@5"], [ndcg_10, ndcg_20, np.nan])
    np.testing.assert_allclose(got["ndcg@10"], [ndcg_10, ndcg_20, np.nan])

    # task 20: k=4, r=2 -> P(first at 1, 2, 3) = 3/6, 2/6, 1/6
    mrr_20 = 3 / 6 * 1 + 2 / 6 / 2 + 1 / 6 / 3
    assert mrr_20 == pytest.approx(13 / 18)
    np.testing.assert_allclose(got["mrr"], [1.0, mrr_20, np.nan])

    ll_10 = -(math.log(0.9) + math.log(0.2) + math.log(0.3) + math.log(0.9)) / 4
    ll_20 = -math.log(0.4) / 2 - math.log(0.6) / 2
    ll_30 = -(math.log(0.8) + math.log(0.3)) / 2
    np.testing.assert_allclose(got["logloss"], [ll_10, ll_20, ll_30])
    assert "mae" not in got and "rmse" not in got


def test_truncation_inside_a_tie_group_is_exact():
    # 3 irrelevant rows on top, then a tie group of 4 (2 relevant) over positions 4..7, then one
    # relevant row at position 8: @5 cuts the tie group after its second slot.
    scores = [0.9, 0.8, 0.7, 0.5, 0.5, 0.5, 0.5, 0.1]
    labels = [0, 0, 0, 1, 0, 1, 0, 1]
    got = per_task_metrics(np.zeros(8, dtype=int), scores, labels)
    ideal_5 = 1 + log2_discount(2) + log2_discount(3)
    dcg_5 = 0.5 * (log2_discount(4) + log2_discount(5))
    dcg_10 = 0.5 * sum(log2_discount(p) for p in range(4, 8)) + log2_discount(8)
    assert got["ndcg@5"][0] == pytest.approx(dcg_5 / ideal_5)
    assert got["ndcg@10"][0] == pytest.approx(dcg_10 / ideal_5)
    assert got["mrr"][0] == pytest.approx(3 / 6 / 4 + 2 / 6 / 5 + 1 / 6 / 6)
    # tied positives each beat 1 of the 2 tied negatives (halves), the last positive beats none
    assert got["auc"][0] == pytest.approx(2 / 15)


def test_ideal_dcg_is_truncated_at_k_too():
    # six relevant of seven: the ideal DCG@5 has five relevant slots, @10 six
    got = per_task_metrics(np.zeros(7, dtype=int), np.arange(7, 0, -1.0), [1, 1, 1, 1, 1, 0, 1])
    top5 = sum(log2_discount(p) for p in range(1, 6))
    assert got["ndcg@5"][0] == pytest.approx(1.0)
    assert got["ndcg@10"][0] == pytest.approx((top5 + log2_discount(7)) / (top5 + log2_discount(6)))


def test_rating_target_gives_mae_and_rmse_not_logloss():
    task = [1, 1, 2, 2, 2]
    predicted = [4.0, 2.0, 3.0, 3.0, 5.0]
    rating = [5.0, 2.0, 1.0, 4.0, 5.0]
    label = [1, 0, 0, 1, 1]
    got = per_task_metrics(task, predicted, label, ratings=rating)
    np.testing.assert_allclose(got["mae"], [0.5, 1.0])
    np.testing.assert_allclose(got["rmse"], [math.sqrt(0.5), math.sqrt(5 / 3)])
    assert "logloss" not in got
    summary = summarize(got, n_boot=0)
    assert summary["mae"]["value"] == pytest.approx((1 + 3) / 5)  # pooled MAE
    assert summary["rmse"]["value"] == pytest.approx(math.sqrt((1 + 4 + 1) / 5))  # pooled RMSE


def test_probabilities_false_skips_logloss():
    got = per_task_metrics([1, 1], [3.0, -2.0], [1, 0], probabilities=False)
    assert "logloss" not in got and got["auc"][0] == 1.0


def test_logloss_clips_certain_wrong_predictions():
    got = per_task_metrics([1, 1], [0.0, 1.0], [1, 0])
    assert got["logloss"][0] == pytest.approx(-math.log(1e-7))


def test_per_task_auc_matches_pooled_auc_on_each_task():
    rng = np.random.default_rng(3)
    task = rng.integers(0, 20, 600)
    score = rng.integers(0, 8, 600) / 8.0  # many ties
    label = rng.random(600) < 0.3
    got = per_task_metrics(task, score, label)
    expected = [auc(score[task == t], label[task == t]) for t in got["task_ids"]]
    np.testing.assert_allclose(got["auc"], expected, rtol=0, atol=1e-12)


def test_string_task_ids_are_sorted():
    got = per_task_metrics(np.array(["u2", "u1", "u2"]), [0.1, 0.2, 0.3], [1, 0, 0])
    assert list(got["task_ids"]) == ["u1", "u2"]
    np.testing.assert_array_equal(got["rows"], [1, 2])


# --------------------------------------------------------------------------- brute force over ties

def strict_order_metrics(labels_in_order):
    """AUC, DCG@5, DCG@10, RR for one strict ranking (labels listed from the top)."""
    labels_in_order = list(labels_in_order)
    n_pos = sum(labels_in_order)
    n_neg = len(labels_in_order) - n_pos
    neg_below, correct = n_neg, 0
    for label in labels_in_order:
        if label:
            correct += neg_below
        else:
            neg_below -= 1
    dcg = {k: sum(log2_discount(i + 1) for i, y in enumerate(labels_in_order[:k]) if y) for k in (5, 10)}
    rr = next((1.0 / (i + 1) for i, y in enumerate(labels_in_order) if y), float("nan"))
    return correct / (n_pos * n_neg) if n_pos and n_neg else float("nan"), dcg[5], dcg[10], rr


def brute_force_expectation(scores, labels):
    """Average every metric over all orders of the rows inside each tie group."""
    groups = [[y for s, y in zip(scores, labels) if s == value] for value in sorted(set(scores), reverse=True)]
    per_order = [strict_order_metrics(itertools.chain(*orders))
                 for orders in itertools.product(*(itertools.permutations(g) for g in groups))]
    auc_mean, dcg5, dcg10, rr = np.mean(per_order, axis=0)
    positives = sum(labels)
    ideal = {k: sum(log2_discount(i + 1) for i in range(min(positives, k))) for k in (5, 10)}
    if not positives:
        return auc_mean, math.nan, math.nan, math.nan
    return auc_mean, dcg5 / ideal[5], dcg10 / ideal[10], rr


@pytest.mark.parametrize("seed", range(12))
def test_tie_rules_equal_the_average_over_all_tie_orders(seed):
    rng = np.random.default_rng(seed)
    n_tasks = int(rng.integers(1, 4))
    sizes = rng.integers(1, 8, n_tasks)  # up to 7 rows: at most 5040 orders
    task = np.repeat(np.arange(n_tasks), sizes)
    score = rng.integers(0, 3, task.size).astype(float)  # three levels: many ties
    label = (rng.random(task.size) < 0.5).astype(int)
    got = per_task_metrics(task, score, label)
    for t in range(n_tasks):
        expected = brute_force_expectation(list(score[task == t]), list(label[task == t]))
        actual = [got[name][t] for name in ("auc", "ndcg@5", "ndcg@10", "mrr")]
        np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12, err_msg=f"task {t}")


def test_large_tie_group_mrr_stays_accurate():
    # one task, 2000 tied rows, 3 relevant: E[1/rank] by the survival product, computed directly
    k, r = 2000, 3
    labels = np.zeros(k, dtype=int)
    labels[:r] = 1
    got = per_task_metrics(np.zeros(k, dtype=int), np.ones(k), labels)
    survive, expected = 1.0, 0.0
    for j in range(1, k - r + 2):
        first_here = survive * r / (k - j + 1)
        expected += first_here / j
        survive *= (k - j + 1 - r) / (k - j + 1)
    assert got["mrr"][0] == pytest.approx(expected, rel=1e-9)
    assert got["auc"][0] == 0.5


# --------------------------------------------------------------------------- aggregation

def test_gauc_weights_by_rows_and_skips_one_class_tasks():
    task = [1, 1] + [2] * 6 + [3] * 50
    score = [0.9, 0.1] + [0.1, 0.2, 0.3, 0.7, 0.8, 0.9] + list(np.linspace(0, 1, 50))
    label = [1, 0] + [1, 1, 1, 0, 0, 0] + [0] * 50  # AUC 1.0, AUC 0.0, one class
    summary = summarize(per_task_metrics(task, score, label), n_boot=0)
    assert summary["gauc"]["value"] == pytest.approx((2 * 1.0 + 6 * 0.0) / 8)
    assert summary["auc_task_mean"]["value"] == pytest.approx(0.5)
    assert summary["tasks"] == 3
    assert summary["tasks_with_both_classes"] == 2
    assert summary["tasks_with_relevant"] == 2
    assert summary["rows"] == 58
    assert math.isnan(summary["gauc"]["lo"])  # no resamples asked for


def test_ranking_means_skip_tasks_without_relevant_rows_and_logloss_is_pooled():
    task, score, label = three_tasks()
    per_task = per_task_metrics(task, score, label)
    summary = summarize(per_task, n_boot=0)
    assert summary["ndcg@5"]["value"] == pytest.approx(np.mean(per_task["ndcg@5"][:2]))
    assert summary["mrr"]["value"] == pytest.approx((1.0 + 13 / 18) / 2)
    p = np.clip(score, 1e-7, 1 - 1e-7)
    pooled_logloss = -np.mean(label * np.log(p) + (1 - label) * np.log(1 - p))
    assert summary["logloss"]["value"] == pytest.approx(pooled_logloss)


def test_constant_score_per_user_pools_well_but_ranks_at_chance():
    # the failure this module exists for: one score per user, equal to the user's click rate
    rng = np.random.default_rng(0)
    user_rate = rng.uniform(0.05, 0.9, 300)
    task = np.repeat(np.arange(300), 20)
    label = rng.random(task.size) < user_rate[task]
    report = evaluate_scores(task, user_rate[task], label, n_boot=200)
    assert report["pooled_auc"]["value"] > 0.75
    assert report["gauc"]["value"] == 0.5 and report["auc_task_mean"]["value"] == 0.5
    assert report["gauc"]["lo"] == report["gauc"]["hi"] == 0.5


def synthetic_per_task(n_tasks, seed):
    rng = np.random.default_rng(seed)
    return {"task_ids": np.arange(n_tasks), "rows": rng.integers(5, 30, n_tasks),
            "positives": np.full(n_tasks, 2), "auc": rng.normal(0.7, 0.1, n_tasks),
            "ndcg@5": rng.uniform(0, 1, n_tasks), "ndcg@10": rng.uniform(0, 1, n_tasks),
            "mrr": rng.uniform(0, 1, n_tasks)}


def test_bootstrap_interval_contains_estimate_shrinks_and_matches_standard_error():
    small = summarize(synthetic_per_task(50, 1), n_boot=2000, seed=0)
    large = summarize(synthetic_per_task(2000, 1), n_boot=2000, seed=0)
    for summary in (small, large):
        for name in ("gauc", "auc_task_mean", "ndcg@5", "ndcg@10", "mrr"):
            assert summary[name]["lo"] < summary[name]["value"] < summary[name]["hi"], name
    width = {n: s["auc_task_mean"]["hi"] - s["auc_task_mean"]["lo"] for n, s in ((50, small), (2000, large))}
    assert width[2000] < width[50] / 4  # ~ 1/sqrt(40)
    # a 95% percentile interval of a mean spans about 2 * 1.96 standard errors
    values = synthetic_per_task(2000, 1)["auc"]
    assert width[2000] == pytest.approx(2 * 1.96 * values.std() / math.sqrt(2000), rel=0.15)


def test_bootstrap_is_reproducible_by_seed():
    per_task = synthetic_per_task(100, 2)
    assert summarize(per_task, seed=5) == summarize(per_task, seed=5)
    assert summarize(per_task, seed=5)["gauc"]["lo"] != summarize(per_task, seed=6)["gauc"]["lo"]


def test_one_task_has_a_degenerate_interval():
    summary = summarize(per_task_metrics([7, 7, 7], [0.9, 0.5, 0.1], [1, 0, 1]), n_boot=100)
    assert summary["gauc"] == {"value": 0.5, "lo": 0.5, "hi": 0.5}
    assert summary["tasks"] == 1


def test_empty_input():
    per_task = per_task_metrics([], [], [])
    assert per_task["task_ids"].size == 0 and per_task["auc"].size == 0
    report = evaluate_scores([], [], [])
    assert report["tasks"] == 0 and report["rows"] == 0
    assert math.isnan(report["gauc"]["value"]) and math.isnan(report["gauc"]["lo"])
    assert math.isnan(report["pooled_auc"]["value"])


def test_no_relevant_rows_anywhere_leaves_ranking_metrics_undefined():
    report = evaluate_scores([1, 1, 2], [0.3, 0.2, 0.1], [0, 0, 0], n_boot=50)
    for name in ("gauc", "ndcg@5", "mrr"):
        assert math.isnan(report[name]["value"]) and math.isnan(report[name]["hi"])
    assert report["tasks_with_relevant"] == 0
    assert report["logloss"]["value"] > 0


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        per_task_metrics([1, 1], [0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="rows"):
        per_task_metrics([1, 1, 1], [0.1, 0.2], [0, 1])
    with pytest.raises(ValueError, match="ci"):
        summarize(synthetic_per_task(3, 0), ci=95)


def test_evaluate_scores_layout():
    task, score, label = three_tasks()
    report = evaluate_scores(task, score, label, n_boot=100)
    assert list(report) == ["gauc", "auc_task_mean", "ndcg@5", "ndcg@10", "mrr", "logloss", "tasks",
                            "tasks_with_both_classes", "tasks_with_relevant", "rows", "pooled_auc"]
    assert report["pooled_auc"]["value"] == auc(score, label)
    assert set(report["mrr"]) == {"value", "lo", "hi"}


# --------------------------------------------------------------------------- paired difference

def two_models(n_tasks, seed, signal_b):
    """Model a ranks with signal 1.5, model b with `signal_b`, on the same query rows."""
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(n_tasks), 12)
    label = rng.random(task.size) < 0.4
    score_a = 1.5 * label + rng.normal(size=task.size)
    score_b = signal_b * label + rng.normal(size=task.size)
    return (per_task_metrics(task, score_a, label, probabilities=False),
            per_task_metrics(task, score_b, label, probabilities=False))


@pytest.mark.parametrize("metric", ["gauc", "auc_task_mean", "ndcg@5", "ndcg@10", "mrr"])
def test_paired_difference_detects_a_real_difference(metric):
    a, b = two_models(300, 0, signal_b=0.0)
    result = paired_difference(a, b, metric, n_boot=500)
    assert result["diff"] == pytest.approx(result["a"] - result["b"])
    assert result["diff"] > 0 and result["lo"] > 0 and result["significant"]
    reverse = paired_difference(b, a, metric, n_boot=500)
    assert reverse["hi"] < 0 and reverse["significant"]


def test_paired_difference_does_not_flag_identical_models():
    a, _ = two_models(100, 1, signal_b=0.0)
    result = paired_difference(a, a, "gauc")
    assert result["diff"] == 0 and result["lo"] == 0 and result["hi"] == 0
    assert not result["significant"]


def test_paired_difference_false_alarm_rate_is_low_for_equally_good_models():
    flagged = sum(paired_difference(*two_models(60, seed, signal_b=1.5), "gauc", n_boot=300,
                                    seed=seed)["significant"] for seed in range(40))
    assert flagged <= 6  # nominal 5% of 40 = 2


def test_paired_difference_aligns_tasks_by_id():
    # a: task 1 AUC 1 (2 rows), task 2 AUC 0 (4 rows), task 3 only in a
    a = per_task_metrics([1, 1, 2, 2, 2, 2, 3, 3], [0.9, 0.1, 0.1, 0.2, 0.8, 0.9, 0.6, 0.4],
                         [1, 0, 1, 1, 0, 0, 1, 0])
    # b: task 0 only in b (sorts first), task 2 AUC 1, task 1 AUC 0, listed in another order
    b = per_task_metrics([0, 0, 2, 2, 2, 2, 1, 1], [0.1, 0.9, 0.9, 0.8, 0.2, 0.1, 0.3, 0.7],
                         [1, 0, 1, 1, 0, 0, 1, 0])
    result = paired_difference(a, b, "gauc", n_boot=200)
    assert result["tasks"] == 2
    assert result["a"] == pytest.approx(1 / 3) and result["b"] == pytest.approx(2 / 3)
    assert result["diff"] == pytest.approx(-1 / 3)


def test_paired_difference_rejects_unknown_or_missing_metrics():
    a, b = two_models(5, 0, signal_b=0.0)
    with pytest.raises(ValueError, match="unknown metric"):
        paired_difference(a, b, "auc")
    with pytest.raises(ValueError, match="no 'mae'"):
        paired_difference(a, b, "mae")


# --------------------------------------------------------------------------- speed

def test_one_million_rows_one_hundred_thousand_tasks_is_fast():
    rng = np.random.default_rng(0)
    task = rng.integers(0, 100_000, 1_000_000)
    score = rng.random(1_000_000).round(3)  # with ties
    label = rng.random(1_000_000) < score
    start = time.perf_counter()
    report = evaluate_scores(task, score, label, n_boot=1000)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"evaluate_scores took {elapsed:.1f} s"
    assert report["rows"] == 1_000_000 and report["tasks"] > 99_000
    assert report["gauc"]["lo"] < report["gauc"]["value"] < report["gauc"]["hi"]
