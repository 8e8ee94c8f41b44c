"""``gmeta bench coldstart``: per-task metrics pooled over seeds, paired differences, and the run
of the whole bench on a tiny MovieLens-latest fixture (real conversions, real training runs)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import last_json, run_gmeta
from test_convert_movielens import _fixture, write_raw

from gmeta.tools.bench.coldstart import SCORERS, pooled
from gmeta.trainer.evaluation.metrics import paired_difference, per_task_metrics, summarize


def _per_task(seed: int, shift: dict) -> dict:
    """A run's per-task arrays: every scorer ranks the same 30 tasks, ``shift`` adds signal."""
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(30), 8)
    label = (rng.random(task.size) < 0.4).astype(float)
    out = {}
    for scorer in SCORERS:
        score = rng.random(task.size) + shift.get(scorer, 0.0) * label
        out[f"auc/{scorer}"] = per_task_metrics(task, score, label, probabilities=False)
    return out


def test_seeds_pool_as_distinct_tasks_with_paired_differences():
    """Two seeds' runs of one setting pool into 60 tasks (same task ids, different seeds kept
    apart); values equal the per-task aggregate of the concatenation and the paired difference
    of the pooled arrays; the targets say which bars the adapted model clears."""
    shift = {"adapted": 1.0, "item_knn": 0.5}
    runs = {("implicit", "time", s, "melu"): _per_task(s, shift) for s in (0, 1)}
    out = pooled(runs, list(runs), n_boot=200)
    both = {k: np.concatenate([runs[r]["auc/adapted"][k] for r in runs]) for k in runs[next(iter(runs))]["auc/adapted"]}
    both["task_ids"] = np.concatenate([runs[r]["auc/adapted"]["task_ids"] + r[2] * (1 << 40) for r in runs])
    assert out["adapted"]["tasks"] == 60
    assert out["adapted"]["gauc"]["value"] == pytest.approx(summarize(both, n_boot=0)["gauc"]["value"])
    knn = {k: np.concatenate([runs[r]["auc/item_knn"][k] for r in runs]) for k in both if k != "task_ids"}
    knn["task_ids"] = both["task_ids"]
    want = paired_difference(both, knn, "gauc", n_boot=200)
    got = out["item_knn"]["adapted_minus"]["gauc"]
    assert got["diff"] == pytest.approx(want["diff"]) and got["tasks"] == want["tasks"] > 50
    assert out["targets"]["gauc >= item_knn"]["met"] and out["targets"]["gauc >= item_mean + 0.01"]["met"]
    assert "ndcg@10" in out["plain"]["adapted_minus"]


@pytest.mark.slow
def test_bench_runs_end_to_end_on_a_latest_layout(tmp_path):
    """The bench converts the raw files under both protocols, trains a model for each seed and
    prints the pooled table; every scorer is there for every setting."""
    items, users, ratings = _fixture()
    src = tmp_path / "ml"
    write_raw(str(src), "latest", items, users, ratings)
    proc = run_gmeta("bench", "coldstart", "--src", src, "--models", "melu", "--cold-users", "random",
                     "--seeds", "0,1", "--negatives", "5", "--train-args", "--epochs 1 --tasks-per-batch 8",
                     "--parallel-runs", "2", cwd=tmp_path, timeout=900)
    result = last_json(proc)
    assert set(result["results"]) == {"explicit/random/melu", "implicit/random/melu"}
    for setting in result["results"].values():
        assert set(SCORERS) <= set(setting)
        assert setting["adapted"]["tasks"] > 0
        assert 0 < setting["item_knn"]["adapted_minus"]["gauc"]["tasks"] <= setting["adapted"]["tasks"]
    assert "adapted minus, paired" in proc.stderr


def test_the_same_tasks_in_every_seed_are_averaged_not_counted_again():
    """The time rule evaluates the same users in every seed: their per-task metrics are averaged
    over the seeds, so the pooled table has one task per user and the interval is not narrowed
    by counting a user three times."""
    runs = {("explicit", "time", s, "melu"): _per_task(s, {"adapted": 1.0}) for s in (0, 1, 2)}
    out = pooled(runs, list(runs), n_boot=200, same_tasks=True)
    assert out["adapted"]["tasks"] == 30
    auc = np.nanmean(np.stack([runs[r]["auc/adapted"]["auc"] for r in runs]), axis=0)
    rows = runs[next(iter(runs))]["auc/adapted"]["rows"]
    defined = np.isfinite(auc)
    want = (auc[defined] * rows[defined]).sum() / rows[defined].sum()
    assert out["adapted"]["gauc"]["value"] == pytest.approx(want)
    distinct = pooled(runs, list(runs), n_boot=200)
    assert distinct["adapted"]["tasks"] == 90
