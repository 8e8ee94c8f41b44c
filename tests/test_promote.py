"""`gmeta promote`: champion and challenger scored on the same tasks, the rule that moves the
alias, what the new model version records, and runs that are never promoted."""

import json
import re

import numpy as np
import pytest
from conftest import REPO, last_json, run_gmeta, train_report

from gmeta.trainer.evaluation.promotion import decide, paired_gain, parse_metric

FLAGS = ["--model", "maml_dnn", "--epochs", "1", "--log-every", "0", "--plain-baseline", "off",
         "--eval-splits", "user_cold", "--checkpoint-dir", "none", "--support-curve", "none"]
#: a model that learns nothing: every step size ~0, no item prior (GAUC ~0.5 on cold users)
UNTRAINED = ["--no-item-prior", "--outer-lr", "1e-9", "--emb-lr", "1e-9", "--inner-solver", "gradient",
             "--inner-lr", "1e-9"]


# ------------------------------------------------------------------------------- the rule itself

def _per_task(task_ids, auc, logloss=None, rows=10):
    pt = {"task_ids": np.asarray(task_ids, np.int64), "rows": np.full(len(task_ids), rows, np.int64),
          "auc": np.asarray(auc, np.float64)}
    if logloss is not None:
        pt["logloss"] = np.asarray(logloss, np.float64)
    return pt


def test_the_rule_needs_the_gain_and_an_interval_above_zero():
    assert decide(gain=0.01, lo=0.001, min_gain=0.002).promote
    kept = decide(gain=0.001, lo=0.0005, min_gain=0.002)      # significant, but too small to matter
    assert not kept.promote and "below --min-gain 0.002" in kept.reason
    noisy = decide(gain=0.05, lo=-0.01, min_gain=0.002)        # large, but could be noise
    assert not noisy.promote and "lower bound -0.0100 is not above 0" in noisy.reason
    assert not decide(gain=0.0, lo=0.0, min_gain=-1.0).promote  # a model equal to the champion never wins
    assert not decide(gain=float("nan"), lo=float("nan"), min_gain=0.0).promote


def test_paired_gain_aligns_tasks_by_id_and_orients_lower_is_better_metrics():
    rng = np.random.default_rng(0)
    ids = np.arange(300)
    champion_auc = rng.uniform(0.4, 0.8, ids.size)
    challenger_auc = champion_auc + 0.03 + rng.normal(0, 0.02, ids.size)
    order = rng.permutation(ids.size)  # the challenger's tasks in another order: paired by id, not position
    champion = _per_task(ids, champion_auc, logloss=np.full(ids.size, 0.6))
    challenger = _per_task(ids[order], challenger_auc[order], logloss=np.full(ids.size, 0.5))
    g = paired_gain(challenger, champion, "gauc")
    assert g["tasks"] == 300 and g["gain"] == pytest.approx(np.mean(challenger_auc - champion_auc))
    assert 0 < g["lo"] < g["gain"] < g["hi"] and decide(g["gain"], g["lo"], 0.002).promote
    # logloss: lower is better, so the challenger's 0.1 lower logloss is a gain of +0.1
    g = paired_gain(challenger, champion, "logloss")
    assert g["gain"] == pytest.approx(0.1) and g["lo"] == pytest.approx(0.1) and g["challenger"] == 0.5
    # a challenger that is the champion plus noise: no promotion, whatever --min-gain allows
    same = _per_task(ids, champion_auc + rng.normal(0, 0.02, ids.size))
    g = paired_gain(same, champion, "gauc")
    assert g["lo"] < 0 < g["hi"] and not decide(g["gain"], g["lo"], -1.0).promote


def test_metric_names_follow_the_headline():
    assert (parse_metric("user_cold/gauc_adapted").split, parse_metric("user_cold/gauc_adapted").metric) == \
        ("user_cold", "gauc")
    assert parse_metric("item_cold/ndcg10_unadapted").metric == "ndcg@10"
    assert str(parse_metric("val/auc_task_mean_adapted")) == "val/auc_task_mean_adapted"
    for bad in ("gauc_adapted", "user_cold/gauc", "user_cold/gauc_item_mean", "user_cold/auc_adapted"):
        with pytest.raises(ValueError, match=re.escape(f"--metric {bad!r}")):
            parse_metric(bad)


# ------------------------------------------------------------------------- end to end, in MLflow

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One sqlite store with two finished runs: one that learned nothing, one trained normally.
    300 cold users, so that the real gap between them (about 0.09 GAUC) is significant."""
    root = tmp_path_factory.mktemp("promote")
    data = root / "data"
    run_gmeta("datagen", "--out", data, "--seed", "1", "--train-users", "200", "--cold-users", "300",
              "--val-users", "20", "--items", "200", "--cold-items", "50", "--quiet", cwd=REPO)
    uri = f"sqlite:///{root}/mlflow.db"
    runs = {}
    for name, extra in (("untrained", UNTRAINED), ("trained", [])):
        proc = run_gmeta("train", "--data", data, "--tracking-uri", uri, "--output-dir", root / "runs", *FLAGS,
                         *extra, cwd=root)
        runs[name] = (last_json(proc)["run_id"], train_report(proc))
    return root, data, uri, runs


def _promote(root, uri, run_id, *extra, check=True):
    return run_gmeta("promote", "--run", run_id, "--name", "recsys", "--tracking-uri", uri, *extra, cwd=root,
                     check=check)


def test_promote_moves_the_alias_only_when_the_challenger_wins(two_runs):
    from mlflow import MlflowClient

    root, data, uri, runs = two_runs
    client = MlflowClient(uri)
    (weak, _), (strong, strong_report) = runs["untrained"], runs["trained"]

    # no champion yet: the challenger becomes the champion, and says so
    first = _promote(root, uri, weak)
    out = last_json(first)
    assert out["decision"] == "promoted" and out["champion_version"] is None and out["challenger_version"] == 1
    assert out["data"] == str(data)   # the dataset the run was trained on, from its MLflow record
    assert "no champion yet" in out["reason"] and "no champion yet" in first.stdout
    assert str(client.get_model_version_by_alias("recsys", "champion").version) == "1"

    # a challenger that is better by far, on the same tasks: promoted, the alias moves
    second = _promote(root, uri, strong)
    out = last_json(second)
    assert out["decision"] == "promoted" and (out["champion_version"], out["challenger_version"]) == (1, 2)
    assert out["gain"] >= 0.002 and 0 < out["lo"] <= out["gain"] <= out["hi"]
    assert out["gain"] == pytest.approx(out["challenger_value"] - out["champion_value"])
    # promote scores the model as gmeta train evaluated it (same rows, same adaptation)
    assert out["challenger_value"] == pytest.approx(strong_report["user_cold"]["gauc_adapted"], abs=1e-4)
    assert str(client.get_model_version_by_alias("recsys", "champion").version) == "2"
    assert "challenger" in second.stdout and "PROMOTED" in second.stdout

    # the weak run again, now against the strong champion: kept, the alias stays
    third = _promote(root, uri, weak)
    out = last_json(third)
    assert out["decision"] == "kept" and (out["champion_version"], out["challenger_version"]) == (2, 3)
    assert out["gain"] < 0 and "below --min-gain 0.002" in out["reason"]
    assert str(client.get_model_version_by_alias("recsys", "champion").version) == "2"

    # every version carries its decision: tags, the full record (both tables, the paired gain), a description
    for version, decision in (("1", "promoted"), ("2", "promoted"), ("3", "kept")):
        mv = client.get_model_version("recsys", version)
        assert mv.tags["gmeta.promote.decision"] == decision and mv.tags["gmeta.promote.metric"] == \
            "user_cold/gauc_adapted"
        assert decision.upper() in mv.description
    record = json.loads(client.get_model_version("recsys", "2").tags["gmeta.promote.record"])
    assert record["decision"] == "promoted" and record["champion_version"] == 1 and record["run_id"] == strong
    assert record["paired"]["gain"] == pytest.approx(float(client.get_model_version("recsys", "2")
                                                           .tags["gmeta.promote.gain"]))
    assert record["challenger"]["gauc_adapted"] == pytest.approx(record["paired"]["challenger"], abs=1e-4)
    assert record["champion"]["gauc_adapted"] == pytest.approx(record["paired"]["champion"], abs=1e-4)
    assert record["challenger"]["tasks"] == record["champion"]["tasks"] == 300
    assert json.loads(client.get_model_version("recsys", "1").tags["gmeta.promote.record"])["champion"] is None
    assert client.get_model_version("recsys", "3").tags["gmeta.promote.champion_version"] == "2"


def test_a_failed_killed_or_running_run_is_never_promoted(two_runs):
    from mlflow import MlflowClient

    from gmeta.trainer.tracking.registry import finished_run

    root, _data, uri, runs = two_runs
    client = MlflowClient(uri)
    trained = client.get_run(runs["trained"][0])
    model_tag = {"gmeta.model_uri": trained.data.tags["gmeta.model_uri"]}   # even with a real logged model
    ids = {}
    for status in ("FAILED", "KILLED", "RUNNING"):
        run = client.create_run(trained.info.experiment_id, tags=model_tag)
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
        ids[status] = run.info.run_id

    proc = _promote(root, uri, ids["FAILED"], check=False)
    assert proc.returncode != 0 and not proc.stdout.strip()
    assert f"--run {ids['FAILED']}: its MLflow run is FAILED, not FINISHED" in proc.stderr
    for status in ("KILLED", "RUNNING"):
        with pytest.raises(ValueError, match=f"--run {ids[status]}: its MLflow run is {status}"):
            finished_run(ids[status], uri)
    with pytest.raises(ValueError, match="no such run"):
        finished_run("0" * 32, uri)
    # nothing was registered for them
    assert all(mv.run_id not in ids.values() for mv in client.search_model_versions("name='recsys'"))
