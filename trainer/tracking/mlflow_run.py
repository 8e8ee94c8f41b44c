"""MLflow tracking for a run: parameters, per-step and per-epoch metrics, tags, inputs, the model.

Only rank 0 talks to MLflow (``enabled=False`` on other ranks makes every call a no-op). The
model is logged as an MLflow pyfunc whose artifact is the gmeta export directory, so it can be
registered and given an alias (``gmeta register``) and loaded back (``gmeta evaluate --model``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys

import requests

from gmeta.trainer.serving.savedmodel import log_pyfunc_model, saved_model_of

MODEL_URI_TAG = "gmeta.model_uri"
# what the served model (gmeta/trainer/serving/pyfunc.py + runtime.py) imports; not gmeta itself
PIP_REQUIREMENTS = ["tensorflow-cpu==2.17.1", "numpy<2", "pandas"]


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """URIs lose their ``user:password@`` part before they are logged (``--tracking-uri``,
    ``--init-from``, ``--data`` may carry one)."""
    return _CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", text)


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
FALLBACK_DB = "mlflow-fallback.db"


def add_tracking_arguments(p, experiment_default: str | None = None) -> None:
    """``--tracking-uri`` (and ``--experiment``): the flag, else ``$MLFLOW_TRACKING_URI`` /
    ``$MLFLOW_EXPERIMENT_NAME``, else the sqlite file in the working directory / the default."""
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
                   help="MLflow tracking URI ($MLFLOW_TRACKING_URI when set); 'none' disables tracking")
    if experiment_default is not None:
        p.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment_default,
                       help="MLflow experiment ($MLFLOW_EXPERIMENT_NAME when set)")


def server_problem(uri: str, timeout_s: float = 5.0) -> str:
    """Why an http(s) tracking server cannot be reached ("" when it answers, or for other stores)."""
    if not uri.startswith(("http://", "https://")):
        return ""

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as exc:
        return f"{type(exc).__name__}"
    return ""


class Tracker:
    """Rank 0's MLflow run (``enabled=False`` elsewhere: every call is a no-op).

    A tracking SERVER that cannot be reached at the start does not stop training: the run is
    logged to ``<fallback_dir>/mlflow-fallback.db`` instead, with one warning saying so. A local
    store that cannot be opened is a configuration error (raised, naming the URI). A logging call
    that fails later warns once; the run goes on, the rest of its MLflow calls are skipped, and
    the results stay in the run directory (``eval_results.json``, ``per_task/``, the export).
    """

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str | None, enabled: bool,
                 run_id: str | None = None, fallback_dir: str = ".", tags: dict | None = None):
        self.enabled = enabled and bool(tracking_uri)
        self.run_id = None
        self.uri = tracking_uri
        self.failure = ""  # why logging stopped, when it did
        if not self.enabled:
            return
        import mlflow

        self._mlflow = mlflow
        # a dead server must not stall training for minutes of retries (the user's settings win)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        problem = server_problem(tracking_uri)
        if problem:
            self.uri = f"sqlite:///{os.path.abspath(os.path.join(fallback_dir, FALLBACK_DB))}"
            os.makedirs(fallback_dir, exist_ok=True)
            _warn(f"WARNING: the MLflow tracking server {tracking_uri} is unreachable ({problem}); training "
                  f"goes on and this run is logged to {self.uri} instead (look at it with mlflow ui "
                  f"--backend-store-uri {self.uri})")
            if run_id:
                _warn(f"WARNING: the resumed run {run_id} lives on {tracking_uri}; its continuation is a new "
                      f"run in the fallback store")
                run_id = None
        try:
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(experiment)
            # run_id: continue that run (a resumed checkpoint) instead of starting a new one
            with contextlib.redirect_stdout(sys.stderr):
                run = (mlflow.start_run(run_id=run_id, log_system_metrics=True) if run_id
                       else mlflow.start_run(run_name=run_name, log_system_metrics=True, tags=tags))
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad store
            raise ValueError(f"--tracking-uri {self.uri}: cannot open the MLflow store or start a run "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); fix the "
                             f"URI, or train without tracking with --tracking-uri none") from None
        self.run_id = run.info.run_id
        if run_id and tags:
            self._call(lambda: mlflow.set_tags(tags))

    def _call(self, fn):
        """Run one MLflow call; the first failure warns and turns the rest off."""
        if not self.enabled or self.failure:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never end a training run
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _warn(f"WARNING: MLflow logging to {self.uri} failed ({self.failure}); training goes on without "
                  f"it. The run's results stay in its output directory")
            return None

    def log_params(self, params: dict) -> None:
        flat = {k: redact(str(v))[:500] for k, v in flatten("", params, {}).items()}
        self._call(lambda: self._mlflow.log_params(flat))

    def log_metrics(self, metrics: dict, step: int | None = None, synchronous: bool = True) -> None:
        # MLflow metric names allow neither "@" (ndcg@5 -> ndcg_at5) nor NaN-free Nones
        flat = {k.replace("@", "_at"): float(v) for k, v in flatten("", metrics, {}).items()
                if isinstance(v, (int, float)) and v is not None}
        if flat:
            self._call(lambda: self._mlflow.log_metrics(flat, step=step, synchronous=synchronous))

    def log_input(self, dataset, context: str) -> None:
        self._call(lambda: self._mlflow.log_input(dataset, context=context))

    def log_dict(self, obj: dict, name: str) -> None:
        self._call(lambda: self._mlflow.log_dict(obj, name))

    def log_artifacts(self, directory: str, artifact_path: str) -> None:
        self._call(lambda: self._mlflow.log_artifacts(directory, artifact_path))

    def log_model(self, export_dir: str) -> str | None:
        if not self.enabled or self.failure:
            return None

        if saved_model_of(export_dir) is None:
            print(f"[gmeta] no MLflow model logged: {export_dir} has no SavedModel (--no-saved-model, or "
                  f"it could not be built; see above)", file=sys.stderr, flush=True)
            return None
        info = self._call(lambda: log_pyfunc_model(self._mlflow, export_dir, PIP_REQUIREMENTS))
        if info is None:
            return None
        self._call(lambda: self._mlflow.set_tag(MODEL_URI_TAG, info.model_uri))
        return info.model_uri

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled or self.run_id is None:
            return
        try:
            # MLflow prints "View run at ..." links on stdout; stdout's last line is our JSON.
            with contextlib.redirect_stdout(sys.stderr):
                self._mlflow.end_run(status=status)
        except Exception:  # noqa: BLE001 - the store may be gone; try the plain client once
            self.mark(status)
        self.enabled = False

    def mark(self, status: str) -> None:
        """Set the run's final status from any thread (the stop watcher's deadline)."""
        if self.run_id is None:
            return
        try:
            from mlflow import MlflowClient

            MlflowClient(self.uri).set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            _warn(f"WARNING: could not mark MLflow run {self.run_id} {status} ({type(exc).__name__})")


def mark_if_running(uri: str | None, run_id: str | None, status: str) -> None:
    """End a run that is still RUNNING (from a rank other than the chief, when the chief may be
    gone: killed, or blocked in a collective). Never raises."""
    if not uri or not run_id:
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def _warn(message: str) -> None:
    print(f"[gmeta] {message}", file=sys.stderr, flush=True)


def model_dir_from_uri(uri: str, tracking_uri: str) -> str:
    """Download a logged/registered gmeta model and return its export directory."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    for root, _dirs, files in os.walk(local):
        if "gmeta_model.json" in files:
            return root
    raise FileNotFoundError(f"{uri}: no gmeta export (gmeta_model.json) inside the model artifacts")


def model_uri_of_run(run_id: str, tracking_uri: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        run = mlflow.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for unknown runs
        raise ValueError(f"--run {run_id}: no such run in {tracking_uri} ({type(exc).__name__})") from None
    uri = run.data.tags.get(MODEL_URI_TAG)
    if not uri:
        raise ValueError(f"--run {run_id}: the run logged no gmeta model (tag {MODEL_URI_TAG} missing)")
    return uri


def resolve_export_dir(source: str, tracking_uri) -> str:
    """A gmeta export directory from a local directory, a ``models:/`` or ``runs:/`` URI, or an
    MLflow run id (downloaded from the tracking store)."""
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "gmeta_model.json")):
            raise FileNotFoundError(f"{source}: a directory but not a gmeta export (no gmeta_model.json)")
        return source
    if not tracking_uri:
        raise ValueError(f"{source}: not a local export directory, and tracking is off (--tracking-uri none)")
    if "://" in source or source.startswith(("models:/", "runs:/")):
        return model_dir_from_uri(source, tracking_uri)
    return model_dir_from_uri(model_uri_of_run(source, tracking_uri), tracking_uri)


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
