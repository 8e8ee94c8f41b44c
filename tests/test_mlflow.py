"""Tracking and registry: a 2-worker run logged to MLflow (sqlite store and a real `mlflow
server` process), registered with an alias, and evaluated back from the registry."""

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, last_json, run_gmeta, train_report

FLAGS = ["--epochs", "1", "--log-every", "0", "--tasks-per-batch", "16", "--plain-baseline", "off",
         "--checkpoint-dir", "none"]


def _run_id(proc) -> str:
    m = re.search(r"mlflow run: ([0-9a-f]{32})", proc.stderr + proc.stdout)
    assert m, proc.stderr[-2000:]
    return m.group(1)


def test_two_worker_run_is_logged_registered_and_evaluated(tiny_synth, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # with tiered embeddings (hot rows replicated, profiled at start): the export and the
    # evaluation below must see one table whatever its tiers; through gmeta launch (horovodrun)
    proc = run_gmeta("launch", "-np", "2", "train", "--model", "melu", "--data", tiny_synth,
                     "--tracking-uri", uri, "--output-dir", tmp_path / "runs", "--tiering", "auto", *FLAGS,
                     cwd=tmp_path, timeout=400, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
                                                     "OMP_NUM_THREADS": "1"})
    trained, report = last_json(proc), train_report(proc)
    run_id = _run_id(proc)
    assert trained["run_id"] == run_id and trained["report_artifact"] == f"runs:/{run_id}/eval_results.json"
    assert "tiering item_id: " in proc.stdout + proc.stderr and " hot rows of " in proc.stdout + proc.stderr
    # normal output is gmeta's own: no MLflow INFO banners (database set-up, system metrics)
    assert " INFO mlflow" not in proc.stdout + proc.stderr

    from mlflow import MlflowClient
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "melu" and run.data.params["workers"] == "2"
    assert run.data.params["tiering"] == "auto"
    # the headline numbers, named as in the last stdout line (<split>.<key>); the rest is the artifact
    assert {k for k in run.data.metrics if k.split(".")[0] in trained["splits"] and ".support_gauc_" not in k} == {
        f"{split}.{k}" for split in trained["splits"] for k, v in trained[split].items()
        if k not in ("tasks", "rows") and v is not None}
    assert run.data.metrics["user_cold.gauc_adapted"] == pytest.approx(report["user_cold"]["gauc_adapted"], abs=1e-6)
    assert run.data.metrics["user_cold.gauc_item_knn"] == trained["user_cold"]["gauc_item_knn"]
    assert "user_cold.ndcg10_adapted" in run.data.metrics and len(run.data.metrics) < 150
    assert "train_loss" in run.data.metrics and "comm_per_step.allreduce.calls" in run.data.metrics
    local = client.download_artifacts(run_id, "eval_results.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == report
    # what ran: versions, world size, source commit; the dataset with its schema and digest
    from gmeta.trainer.tracking.run_info import dataset_digest, source_commit
    tags = run.data.tags
    assert tags["gmeta.world_size"] == "2" and tags["tensorflow.version"] == "2.17.1"
    assert tags["horovod.version"] and tags["gmeta.version"]
    if source_commit():
        assert tags["mlflow.source.git.commit"] == source_commit()["commit"]
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == dataset_digest(str(tiny_synth))[0] and '"name": "task_id"' in inp.dataset.schema
    # per-step metrics (at least one point per epoch with --log-every 0): the global loss and
    # real tasks/s; system metrics; per-epoch input statistics of rank 0's share
    (point,) = client.get_metric_history(run_id, "step_loss")
    assert point.step == int(run.data.params["steps_per_epoch"]) and point.value > 0
    assert run.data.metrics["tasks_per_s"] > 0
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    assert 0 < run.data.metrics["input_tasks_read"] < 300  # rank 0's share of the 300 training tasks
    # the support curve (GAUC against support rows) as metrics and in the report, and the plots
    curve = report["user_cold"]["support_curve"]
    assert curve["k"] == [0, 1, 2, 5, 10, 20, "all"]
    assert curve["adapted"][0] == curve["unadapted"][0] == pytest.approx(report["user_cold"]["gauc_unadapted"], abs=1e-4)
    assert curve["adapted"][-1] == pytest.approx(report["user_cold"]["gauc_adapted"], abs=1e-4)
    history = client.get_metric_history(run_id, "user_cold.support_gauc_adapted")
    assert [m.step for m in sorted(history, key=lambda m: m.step)][:6] == [0, 1, 2, 5, 10, 20]
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/learning_curve.png", "plots/support_curve.png", "plots/calibration.png"}

    out = run_gmeta("register", "--run", run_id, "--name", "melu", "--alias", "champion",
                    "--tracking-uri", uri, cwd=tmp_path)
    assert "models:/melu@champion" in out.stdout
    version = client.get_model_version_by_alias("melu", "champion")
    assert str(version.version) == "1"

    # the registered model is models-from-code over the SavedModel that rank 0 wrote inside the
    # 2-worker Horovod job (no Horovod op in it), with an environment that does not need gmeta
    import mlflow
    from mlflow.models import Model

    from gmeta.trainer.serving.savedmodel import horovod_ops

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # the registry follows the tracking URI
    try:
        local = Path(mlflow.artifacts.download_artifacts("models:/melu@champion",
                                                         dst_path=str(tmp_path / "downloaded")))
    finally:
        mlflow.set_tracking_uri(previous)
    logged = Model.load(str(local))
    assert logged.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert logged.signature.params.to_dict()[0]["name"] == "steps"
    assert "input_example.json" in {p.name for p in local.iterdir()}
    requirements = (local / "requirements.txt").read_text().split()
    assert "tensorflow-cpu==2.17.1" in requirements and not [r for r in requirements if "gmeta" in r]
    assert horovod_ops(str(local / "artifacts" / "model" / "saved_model")) == []

    evaluated = last_json(run_gmeta("evaluate", "--model", "models:/melu@champion", "--data", tiny_synth,
                                    "--tasks-per-batch", "16", "--tracking-uri", uri, cwd=tmp_path))
    # the registered model, evaluated in one process, reproduces the 2-worker evaluation
    for split, res in report.items():
        for key in ("auc_adapted", "auc_unadapted"):
            assert abs(evaluated[split][key] - res[key]) < 1e-4, (split, key, evaluated[split], res)
        assert evaluated[split]["rows"] == res["rows"]

    bad = run_gmeta("evaluate", "--run", "0" * 32, "--data", tiny_synth, "--tracking-uri", uri,
                    cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "no such run" in bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    import urllib.request
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up within 90 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_run_logged_to_a_real_mlflow_server(tiny_synth, tmp_path, mlflow_server):
    proc = run_gmeta("train", "--model", "maml_dnn", "--data", tiny_synth, "--tracking-uri", mlflow_server,
                     "--experiment", "server-test", "--output-dir", tmp_path / "runs", *FLAGS,
                     "--support-curve", "none", cwd=tmp_path)
    run_id = _run_id(proc)
    from mlflow import MlflowClient
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("gmeta.model_uri", "").startswith("models:/")
    evaluated = last_json(run_gmeta("evaluate", "--run", run_id, "--data", tiny_synth,
                                    "--tasks-per-batch", "16", "--tracking-uri", mlflow_server,
                                    cwd=tmp_path))
    assert evaluated["user_cold"]["auc_adapted"] == pytest.approx(train_report(proc)["user_cold"]["auc_adapted"],
                                                                    abs=1e-4)


def test_tracking_flags_default_to_mlflow_environment_variables(monkeypatch):
    import argparse

    from gmeta.trainer.tracking.mlflow_run import DEFAULT_TRACKING_URI, add_tracking_arguments

    def parsed(*argv):
        p = argparse.ArgumentParser()
        add_tracking_arguments(p, "gmeta")
        return p.parse_args(list(argv))

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert (parsed().tracking_uri, parsed().experiment) == (DEFAULT_TRACKING_URI, "gmeta")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "cold-start")
    assert (parsed().tracking_uri, parsed().experiment) == ("http://127.0.0.1:5999", "cold-start")
    assert parsed("--tracking-uri", "none").tracking_uri == "none"  # the flag wins


def test_unreachable_tracking_server_warns_once_and_logs_to_a_local_fallback(tmp_path, capsys):
    """A tracking server that does not answer must not stop training or lose the run: one
    warning, and the run goes to a sqlite store in the output directory."""
    from mlflow import MlflowClient

    from gmeta.trainer.tracking.mlflow_run import FALLBACK_DB, Tracker

    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    tracker = Tracker(dead, "gmeta", "r", enabled=True, fallback_dir=str(tmp_path))
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 0.5}, step=3)
    tracker.finish()
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and f"{dead} is unreachable" in err
    fallback = f"sqlite:///{tmp_path / FALLBACK_DB}"
    assert tracker.uri == fallback and fallback in err
    run = MlflowClient(fallback).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"} and run.data.metrics == {"loss": 0.5}


def test_a_local_store_that_cannot_be_opened_is_a_clear_error(tmp_path):
    from gmeta.trainer.tracking.mlflow_run import Tracker

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"--tracking-uri sqlite:///.*/file/sub/m.db: cannot open the MLflow store"):
        Tracker(f"sqlite:///{blocker}/sub/m.db", "gmeta", "r", enabled=True)


def test_credentials_in_uris_never_reach_the_logged_parameters(tmp_path):
    from mlflow import MlflowClient

    from gmeta.trainer.tracking.mlflow_run import Tracker, redact

    assert redact("https://alice:s3cret@mlflow.example.com/x") == "https://***@mlflow.example.com/x"
    assert redact("hdfs://nn:8020/data") == "hdfs://nn:8020/data" and redact("runs/abc") == "runs/abc"
    uri = f"sqlite:///{tmp_path}/m.db"
    tracker = Tracker(uri, "gmeta", "r", enabled=True)
    tracker.log_params({"init_from": "https://bob:hunter2@host/models/1", "data": "hdfs://u:p@nn/d"})
    tracker.finish()
    params = MlflowClient(uri).get_run(tracker.run_id).data.params
    assert "hunter2" not in str(params) and ":p@" not in str(params)
    assert params["init_from"] == "https://***@host/models/1"
