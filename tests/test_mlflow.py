"""Tracking and registry: a 2-worker run logged to MLflow (sqlite store and a real `mlflow
server` process), registered with an alias, and evaluated back from the registry."""

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, horovodrun, last_json, run_gmeta

FLAGS = ["--epochs", "1", "--log-every", "0", "--tasks-per-batch", "16", "--plain-baseline", "off",
         "--checkpoint-dir", "none"]


def _run_id(proc) -> str:
    m = re.search(r"mlflow run: ([0-9a-f]{32})", proc.stderr + proc.stdout)
    assert m, proc.stderr[-2000:]
    return m.group(1)


def test_two_worker_run_is_logged_registered_and_evaluated(tiny_synth, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = horovodrun(2, [BIN / "gmeta", "train", "--model", "melu", "--data", tiny_synth,
                          "--tracking-uri", uri, "--output-dir", tmp_path / "runs", *FLAGS],
                      timeout=400)
    trained = last_json(proc)
    run_id = _run_id(proc)

    from mlflow import MlflowClient
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "melu" and run.data.params["workers"] == "2"
    assert abs(run.data.metrics["user_cold.auc_adapted"] - trained["user_cold"]["auc_adapted"]) < 1e-6
    assert "train_loss" in run.data.metrics and "comm_per_step.allreduce.calls" in run.data.metrics

    out = run_gmeta("register", "--run", run_id, "--name", "melu", "--alias", "champion",
                    "--tracking-uri", uri, cwd=tmp_path)
    assert "models:/melu@champion" in out.stdout
    version = client.get_model_version_by_alias("melu", "champion")
    assert str(version.version) == "1"

    # the registered model is models-from-code over the SavedModel that rank 0 wrote inside the
    # 2-worker Horovod job (no Horovod op in it), with an environment that does not need gmeta
    import mlflow
    from mlflow.models import Model

    from gmeta.trainer.savedmodel import horovod_ops

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
    for split, res in trained.items():
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
                     "--experiment", "server-test", "--output-dir", tmp_path / "runs", *FLAGS, cwd=tmp_path)
    run_id = _run_id(proc)
    from mlflow import MlflowClient
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("gmeta.model_uri", "").startswith("models:/")
    evaluated = last_json(run_gmeta("evaluate", "--run", run_id, "--data", tiny_synth,
                                    "--tasks-per-batch", "16", "--tracking-uri", mlflow_server,
                                    cwd=tmp_path))
    assert evaluated["user_cold"]["auc_adapted"] == pytest.approx(last_json(proc)["user_cold"]["auc_adapted"],
                                                                    abs=1e-4)
