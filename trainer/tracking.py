"""MLflow tracking for a run: parameters, per-epoch metrics, final metrics, the model.

Only rank 0 talks to MLflow (``enabled=False`` on other ranks makes every call a no-op). The
model is logged as an MLflow pyfunc whose artifact is the gmeta export directory, so it can be
registered and given an alias (``gmeta register``) and loaded back (``gmeta evaluate --model``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

MODEL_URI_TAG = "gmeta.model_uri"
# what the served model (gmeta/trainer/pyfunc.py + serving.py) imports; not gmeta itself
PIP_REQUIREMENTS = ["tensorflow-cpu==2.17.1", "numpy<2", "pandas"]


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


class Tracker:
    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str | None, enabled: bool,
                 run_id: str | None = None):
        self.enabled = enabled and bool(tracking_uri)
        self.run_id = None
        if not self.enabled:
            return
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        # run_id: continue that run (a resumed checkpoint) instead of starting a new one
        run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name)
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        if self.enabled:
            flat = {k: str(v)[:500] for k, v in flatten("", params, {}).items()}
            self._mlflow.log_params(flat)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.enabled:
            # MLflow metric names allow neither "@" (ndcg@5 -> ndcg_at5) nor NaN-free Nones
            flat = {k.replace("@", "_at"): float(v) for k, v in flatten("", metrics, {}).items()
                    if isinstance(v, (int, float)) and v is not None}
            self._mlflow.log_metrics(flat, step=step)

    def log_dict(self, obj: dict, name: str) -> None:
        if self.enabled:
            self._mlflow.log_dict(obj, name)

    def log_artifacts(self, directory: str, artifact_path: str) -> None:
        if self.enabled:
            self._mlflow.log_artifacts(directory, artifact_path)

    def log_model(self, export_dir: str) -> str | None:
        if not self.enabled:
            return None
        from gmeta.trainer.savedmodel import log_pyfunc_model, saved_model_of

        if saved_model_of(export_dir) is None:
            print(f"[gmeta] no MLflow model logged: {export_dir} has no SavedModel (--no-saved-model, or "
                  f"it could not be built; see above)", file=sys.stderr, flush=True)
            return None
        info = log_pyfunc_model(self._mlflow, export_dir, PIP_REQUIREMENTS)
        self._mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        return info.model_uri

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            # MLflow prints "View run at ..." links on stdout; stdout's last line is our JSON.
            with contextlib.redirect_stdout(sys.stderr):
                self._mlflow.end_run(status=status)


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
