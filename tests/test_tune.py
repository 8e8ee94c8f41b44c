"""`gmeta tune`: an Optuna study over a zoo model's search space, scored by validation GAUC adapted.

Real runs on a tiny synthetic dataset (no mocks of train()): a 3-trial study persists in its
sqlite storage and resumes (its new trial under horovodrun); the printed `gmeta train` command
parses with train's own parser and rebuilds the best trial's parameters; MLflow holds one parent
run per study with a child run per trial; a trial below a pruning threshold ends PRUNED; a
dataset without a validation split gives a clear error. The search spaces themselves are checked
in-process: every sampled point is a valid TrainConfig whose command line round-trips.
"""

import argparse
import json
import shlex
import shutil

import pytest
from conftest import last_json, run_gmeta

from gmeta.trainer.config import TrainConfig, add_arguments, config_from_args
from gmeta.trainer.tuning.argv import rerun_command
from gmeta.trainer.tuning.space import MODEL_SPACES, SHARED_SPACE, Param, apply_values, search_space, suggest

VAL = "user_cold"   # the generator's `val` split may be absent; tune on a cold split


def tune(data, tmp_path, *flags, check=True, study="s"):
    return run_gmeta("tune", "--model", "melu", "--data", data, "--validation-split", VAL,
                     "--storage", f"sqlite:///{tmp_path}/optuna.db", "--study-name", study,
                     "--study-dir", tmp_path / "study", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                     "--experiment", "tune-test", "--set", "log_every=0", *map(str, flags),
                     cwd=tmp_path, check=check)


def load_study(tmp_path, name="s"):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def mlflow_runs(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("gmeta.tune.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def parse_train_command(command: str):
    argv = shlex.split(command)
    assert argv[:2] == ["gmeta", "train"], command
    p = argparse.ArgumentParser()
    add_arguments(p)
    return argv, config_from_args(p.parse_args(argv[2:]))


@pytest.mark.slow  # fast tier: a full study with pruning (test_a_trial_below_the_threshold_is_pruned)
def test_study_runs_resumes_and_prints_a_rerun_command(tiny_synth, tmp_path):
    from optuna.trial import TrialState

    # first-order MAML held fixed (--set leaves the search): second derivatives cost minutes here;
    # no early stopping, so a trial's value is its one epoch's
    fixed = ("--set", "first_order=true", "--set", "early_stopping=0")
    first = last_json(tune(tiny_synth, tmp_path, "--epochs", "1", "--n-trials", "2", "--seed", "3", *fixed))
    assert first["n_trials"] == 2 and first["n_pruned"] == 0
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:
        # the value is the final model's validation GAUC; for melu that is the last epoch's
        assert set(t.intermediate_values) == {0} and t.value == pytest.approx(t.intermediate_values[0])

    # resumed, with the new trial under horovodrun: same study, same parent run, no pruning
    again = tune(tiny_synth, tmp_path, "--epochs", "1", "--n-trials", "1", "--seed", "3", "--workers", "2", *fixed)
    out = last_json(again)
    assert "2 earlier trial(s)" in again.stderr and "pruning is not available" in again.stderr
    assert out["n_trials"] == 3 and out["study_name"] == "s"
    study = load_study(tmp_path)
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)
    resumed = study.trials[2]
    assert resumed.params != study.trials[0].params       # the resumed sampler does not repeat draws
    assert resumed.value == pytest.approx(resumed.intermediate_values[0])   # curve read from MLflow
    assert out["best_value"] == pytest.approx(study.best_value)
    assert out["best_trial"] == study.best_trial.number
    assert "trial  state" in again.stderr and "rerun it: gmeta train" in again.stderr
    # how far the winner can be trusted: its interval, the baselines, the runner-up, warnings
    lo, hi = out["best_interval"]
    assert lo <= out["best_value"] <= hi and out["validation_tasks"] > 0
    assert set(out["baselines"]) == {"unadapted", "item_mean", "item_knn"}
    assert set(out["best_minus_baselines"]) == {"unadapted", "item_mean", "item_knn"}
    runner = out["runner_up"]
    assert runner["trial"] != out["best_trial"] and runner["value"] <= out["best_value"]
    assert runner["best_minus_runner_up"]["diff"] == pytest.approx(out["best_value"] - runner["value"], abs=1e-4)
    assert any("fewer than 200" in w for w in out["warnings"])     # the tiny validation split
    assert "WARNING: the validation split" in again.stderr

    # the command line: gmeta train's own parser rebuilds exactly the best trial's parameters
    best = study.best_trial.user_attrs["params"]
    assert out["best_params"] == best
    argv, cfg = parse_train_command(out["command"])
    assert cfg.model == "melu" and cfg.epochs == 1 and cfg.validation_split == VAL and cfg.log_every == 0
    assert cfg.first_order is True and "first_order" not in best and "inner_lr" in best
    for name, value in best.items():
        got = getattr(cfg, name)
        assert (list(got) if isinstance(got, tuple) else got) == value, name
        flag = "--" + name.replace("_", "-")
        if not isinstance(value, bool) or value:   # a false switch is its absence
            assert flag in argv, (flag, out["command"])

    # MLflow: one parent run for the study (reused on resume), one child run per trial
    parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(int(r.data.tags["gmeta.tune.trial"]) for r in children) == [0, 1, 2]
    assert all(r.info.status == "FINISHED" and r.data.tags["gmeta.tune.state"] == "COMPLETE" for r in children)
    assert parent.data.metrics["best_value"] == pytest.approx(out["best_value"])
    assert out["mlflow_run_id"] in {r.info.run_id for r in children}
    workers = {int(r.data.tags["gmeta.tune.trial"]): r.data.params["workers"] for r in children}
    assert workers == {0: "1", 1: "1", 2: "2"}


def test_a_trial_below_the_threshold_is_pruned(tiny_synth, tmp_path):
    # the median pruner waits for 5 completed trials; the threshold prunes after epoch 0
    proc = tune(tiny_synth, tmp_path, "--epochs", "2", "--n-trials", "1", "--prune-below", "0.999",
                "--prune-warmup-epochs", "0", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "trial 0 pruned after epoch 0" in proc.stderr
    assert "no trial of study 's' completed" in proc.stderr
    (trial,) = load_study(tmp_path).trials
    assert trial.state.name == "PRUNED" and set(trial.intermediate_values) == {0}
    parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 1
    assert children[0].info.status == "KILLED" and children[0].data.tags["gmeta.tune.state"] == "PRUNED"
    assert "val_gauc_adapted" in children[0].data.metrics


def test_a_dataset_without_a_validation_split_is_refused(tiny_synth, tmp_path):
    data = tmp_path / "noval"
    shutil.copytree(tiny_synth, data)
    schema = json.loads((data / "schema.json").read_text())
    schema["splits"] = [s for s in schema["splits"] if s != "val"]
    (data / "schema.json").write_text(json.dumps(schema))
    shutil.rmtree(data / "val", ignore_errors=True)
    proc = run_gmeta("tune", "--model", "melu", "--data", data, "--storage", f"sqlite:///{tmp_path}/o.db",
                     "--tracking-uri", "none", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "needs a validation split" in proc.stderr and "--validation-split" in proc.stderr
    assert not (tmp_path / "o.db").exists()


@pytest.mark.parametrize("model", ["melu", "maml_dnn", "maml_esmm", "metaemb"])
def test_every_sampled_point_is_a_valid_config_with_a_round_trip_command(model):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space(model)
    names = {p.name for p in space}
    assert {"inner_lr", "inner_steps", "outer_lr", "emb_lr", "meta_sgd", "first_order", "hidden",
            "emb_dim", "clip_norm"} <= names
    assert ("extra.alpha" in names) == (model == "metaemb")
    assert search_space(model, fixed=("inner_lr",)) == tuple(p for p in space if p.name != "inner_lr")
    base = TrainConfig(model=model, data="d", epochs=2, validation_split=VAL, log_every=0)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(25):
        values = suggest(study.ask(), space)
        cfg = apply_values(base, values).validate()
        _, back = parse_train_command(rerun_command(cfg, tuple(values)))
        assert back == cfg


def test_the_rerun_command_does_not_depend_on_the_shell(monkeypatch):
    """With MLFLOW_TRACKING_URI set elsewhere (MLflow itself sets it in process), a trial logged
    to the default store still gets a command that says so."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    cfg = TrainConfig(model="melu", data="d", epochs=2, validation_split=VAL, log_every=0).validate()
    command = rerun_command(cfg, ())
    assert f"--tracking-uri {cfg.tracking_uri}" in command
    _, back = parse_train_command(command)
    assert back == cfg


def test_an_entry_for_a_missing_field_is_skipped(monkeypatch):
    extra = Param("no_such_field", "bool", requires_field="no_such_field")
    monkeypatch.setitem(MODEL_SPACES, "melu", SHARED_SPACE + (extra,))
    assert "no_such_field" not in {p.name for p in search_space("melu")}
    with pytest.raises(ValueError, match="not in melu's search space"):
        search_space("melu", names=("no_such_field",))
