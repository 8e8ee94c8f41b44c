"""Serving what was meta-learned: the exported SavedModel adapts to a cold user in a fresh process
that has only TensorFlow and numpy, `gmeta predict` and `gmeta evaluate --predictions-out` agree,
and the registered MLflow model answers over HTTP (`mlflow models serve`) with the adapted scores
`gmeta evaluate` computes. Real processes and stores throughout; nothing is mocked."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import numpy as np
import pytest
from conftest import BIN, last_json, run_gmeta

MODELS = ("melu", "maml_esmm", "metaemb")
FLAGS = ["--epochs", "1", "--log-every", "0", "--tasks-per-batch", "16", "--plain-baseline", "off",
         "--checkpoint-dir", "none", "--validation-split", "none", "--support-curve", "none"]
SPLIT = {"melu": "user_cold", "maml_esmm": "user_cold", "metaemb": "item_cold"}  # metaemb: unseen items
HEADS = {"score": "auc", "score_ctcvr": "auc_ctcvr"}
TOL = 1e-5


def _env(**extra) -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)


@pytest.fixture(scope="module")
def trained(tiny_synth, tmp_path_factory):
    """MeLU (logged to a sqlite store and registered as coldstart@champion by --register-as),
    MAML-ESMM and MetaEmb, trained concurrently for one epoch on the tiny dataset."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    procs = {}
    for model in MODELS:
        argv = [str(BIN / "gmeta"), "train", "--model", model, "--data", str(tiny_synth),
                "--output-dir", str(root / model),
                *(["--tracking-uri", uri, "--register-as", "coldstart@champion"] if model == "melu"
                  else ["--tracking-uri", "none"]),
                *FLAGS, *(["--generator-epochs", "1"] if model == "metaemb" else [])]
        procs[model] = subprocess.Popen(argv, cwd=root, env=_env(), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    exports = {}
    for model, proc in procs.items():
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{model}: {err[-4000:]}"
        exports[model] = re.search(r"^export: (.+)$", err, re.M).group(1)
        if model == "melu":
            assert "models:/coldstart@champion" in err  # --register-as registered it
            # logging the model (models-from-code, signature, input example) warns about nothing
            assert [line for line in err.splitlines() if "warn" in line.lower() and "mlflow" in line.lower()] == []
    with open(os.path.join(exports["metaemb"], "gmeta_model.json")) as f:
        assert json.load(f)["model_state"]["generate_for"] == "cold"  # unseen items: generated embeddings
    return {"root": root, "uri": uri, "exports": exports}


@pytest.fixture(scope="module")
def evaluated(trained, tiny_synth):
    """`gmeta evaluate` of the registered model with --predictions-out: the reference rows."""
    out = trained["root"] / "eval_predictions.parquet"
    proc = run_gmeta("evaluate", "--model", "models:/coldstart@champion", "--data", tiny_synth,
                     "--eval-splits", "user_cold", "--tasks-per-batch", "16", "--tracking-uri",
                     trained["uri"], "--predictions-out", out, cwd=trained["root"])
    import pandas as pd

    return last_json(proc), pd.read_parquet(out)


FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    out = {}
    for model, (saved, arrays) in json.loads(sys.argv[1]).items():
        loaded = tf.saved_model.load(saved)
        a = np.load(arrays)
        sigs = loaded.signatures
        names = sigs["adapt_and_predict"].structured_input_signature[1]
        task = {n: tf.constant(a[n]) for n in names}
        r = {k: v.numpy() for k, v in sigs["adapt_and_predict"](**task).items()}
        r0 = sigs["adapt_and_predict_steps"](steps=tf.constant(0), **task)
        mask = a["query_mask"] > 0
        rows = {n: tf.constant(a["query_" + n][mask]) for n in sigs["predict"].structured_input_signature[1]}
        plain = sigs["predict"](**rows)
        out[model] = {"adapted": {k: r[k][mask].tolist() for k in r},
                      "steps0": r0["score_adapted"].numpy()[mask].tolist(),
                      "predict": plain["score"].numpy().tolist()}
    out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("gmeta", "horovod", "mlflow"))
    print(json.dumps(out))
""")


def test_saved_model_adapts_in_a_tensorflow_only_process_like_eval_step(trained, tiny_synth, tmp_path):
    """adapt_and_predict (loaded with TensorFlow alone) == learner.eval_step on the same tasks."""
    from gmeta.io.reader import MetaReader
    from gmeta.trainer.serving.export import load_model
    from gmeta.trainer.serving.savedmodel import horovod_ops, trained_steps

    jobs, refs = {}, {}
    for model, export in trained["exports"].items():
        saved = os.path.join(export, "saved_model")
        assert horovod_ops(saved) == []
        learner, meta = load_model(export)
        run = meta["run_config"]
        reader = MetaReader(str(tiny_synth), split=SPLIT[model], tasks_per_batch=16, shuffle=False, seed=0,
                            support_size=run["support_size"], query_size=run["query_size"])
        batch = next(iter(reader.dataset(epoch=0)))
        ref = {k: v.numpy() for k, v in learner.eval_step(batch, trained_steps(meta)).items()}
        arrays = {f"{side}_{k}": v.numpy() for side in ("support", "query") for k, v in batch[side].items()}
        np.savez(tmp_path / f"{model}.npz", **arrays)
        jobs[model] = [saved, str(tmp_path / f"{model}.npz")]
        refs[model] = (ref, arrays["query_mask"] > 0)
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("modules") == []  # TensorFlow alone loaded and ran it
    for model, (ref, mask) in refs.items():
        adapted = got[model]["adapted"]
        assert set(adapted) == {f"{o}_{k}" for o in ("score", "score_ctcvr")[:1 + (model == "maml_esmm")]
                                for k in ("adapted", "unadapted")}
        for name, values in adapted.items():
            head, kind = name.rsplit("_", 1)
            np.testing.assert_allclose(values, ref[f"{HEADS[head]}/{kind}"][mask], atol=TOL, err_msg=f"{model} {name}")
        # adaptation changed the scores; steps=0 and `predict` are the unadapted model
        assert np.abs(np.array(adapted["score_adapted"]) - adapted["score_unadapted"]).max() > 1e-3
        np.testing.assert_allclose(got[model]["steps0"], ref["auc/unadapted"][mask], atol=TOL)
        np.testing.assert_allclose(got[model]["predict"], ref["auc/unadapted"][mask], atol=TOL)


def test_gmeta_predict_scores_query_rows_like_gmeta_evaluate(trained, evaluated, tiny_synth, tmp_path):
    """A split in, the same rows out (CSV) with scores on query rows, equal to evaluate's rows."""
    import pandas as pd

    _, reference = evaluated
    out = tmp_path / "scored.csv"
    summary = last_json(run_gmeta("predict", "--model", trained["exports"]["melu"], "--input",
                                  tiny_synth / "user_cold", "--out", out, cwd=tmp_path))
    scored = pd.read_csv(out)
    assert summary["rows"] == len(scored) and summary["tasks"] == 60
    support = scored[scored.is_query == 0]
    assert support.score_adapted.isna().all() and support.score_unadapted.isna().all()
    query = scored[scored.is_query == 1].copy()
    assert query.score_adapted.notna().all()
    query["query_position"] = query.groupby("task_id").cumcount()
    both = reference.merge(query, left_on=["task", "query_position"], right_on=["task_id", "query_position"],
                           suffixes=("_ref", ""))
    assert len(both) == len(reference) == summary["query_rows"]
    assert (both["item"] == both["item_id"]).all()
    for kind in ("adapted", "unadapted"):
        np.testing.assert_allclose(both[f"score_{kind}"], both[f"score_{kind}_ref"], atol=TOL)
    # list features survive the CSV round trip as "|"-joined ids
    assert scored.item_tags.astype(str).str.fullmatch(r"\d+(?:\|\d+)*").all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def mlflow_server(model_uri: str, root, tracking_uri: str, log_name: str = "serve.log"):
    """``mlflow models serve -m MODEL_URI`` on a free port, answering /ping; yields its base URL
    and stops it (its whole process group) on exit. Its output goes to ``root/log_name``."""
    port = _free_port()
    log_path = root / log_name
    log = open(log_path, "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, env=_env(MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow models serve did not answer /ping within 120 s:\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()


def test_registered_model_served_over_http_adapts_like_gmeta_evaluate(trained, evaluated, tiny_synth):
    """mlflow models serve -m models:/coldstart@champion; POST one cold user's support and query
    rows; the adapted scores equal gmeta evaluate's for that user."""
    import pyarrow as pa
    import pyarrow.orc as orc

    results, reference = evaluated
    # a cold user whose support and query rows all fit the trained caps, so evaluate saw them all
    meta = json.load(open(os.path.join(trained["exports"]["melu"], "saved_model", "gmeta_serving.json")))
    table = pa.concat_tables(orc.read_table(f) for f in sorted(glob.glob(f"{tiny_synth}/user_cold/*.orc")))
    frame = table.to_pandas()
    sizes = frame.groupby("task_id").is_query.agg(["sum", "size"])
    fits = sizes[(sizes["size"] - sizes["sum"] <= meta["support_size"])
                 & (sizes["sum"] <= meta["query_size"]) & (sizes["sum"] >= 3)].index
    user = int(fits[0])
    rows = frame[frame.task_id == user]
    columns = ["task_id", "is_query", *meta["labels"], *(f["name"] for f in meta["sparse"]), *meta["dense"]]
    data = [[v.tolist() if isinstance(v, np.ndarray) else v for v in row]
            for row in rows[columns].astype(object).itertuples(index=False)]
    body = {"dataframe_split": {"columns": columns, "data": data}}

    with mlflow_server("models:/coldstart@champion", trained["root"], trained["uri"]) as url:
        answer = pd_frame(_post(f"{url}/invocations", body))
        ref = reference[(reference.split == "user_cold") & (reference.task == user)].sort_values("query_position")
        query_rows = np.flatnonzero(rows.is_query.to_numpy() == 1)
        assert answer["row"].tolist() == query_rows.tolist() and (answer["task_id"] == user).all()
        np.testing.assert_allclose(answer["score_adapted"], ref["score_adapted"], atol=TOL)
        np.testing.assert_allclose(answer["score_unadapted"], ref["score_unadapted"], atol=TOL)
        assert np.abs(answer["score_adapted"] - answer["score_unadapted"]).max() > 1e-3
        # params: zero inner steps is the unadapted model
        zero = pd_frame(_post(f"{url}/invocations", {**body, "params": {"steps": 0}}))
        np.testing.assert_allclose(zero["score_adapted"], ref["score_unadapted"], atol=TOL)
        # loading the model and answering printed no warning
        assert "WARNING" not in (trained["root"] / "serve.log").read_text()


def pd_frame(response: dict):
    import pandas as pd

    return pd.DataFrame(response["predictions"])
