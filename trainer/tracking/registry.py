"""The MLflow model registry: a run's logged model as a new version of a registered model, and
an alias pointed at it (``gmeta register`` and ``gmeta train --register-as``)."""

from __future__ import annotations

from dataclasses import dataclass

from gmeta.trainer.tracking.mlflow_run import DEFAULT_TRACKING_URI, model_uri_of_run


@dataclass(frozen=True)
class RegisterConfig:
    run: str
    name: str
    alias: str = ""
    tracking_uri: str = DEFAULT_TRACKING_URI


def register(cfg: RegisterConfig) -> dict:
    import mlflow
    from mlflow import MlflowClient

    uri = model_uri_of_run(cfg.run, cfg.tracking_uri)
    version = mlflow.register_model(uri, cfg.name)
    if cfg.alias:
        MlflowClient(cfg.tracking_uri).set_registered_model_alias(cfg.name, cfg.alias, version.version)
    where = f"models:/{cfg.name}@{cfg.alias}" if cfg.alias else f"models:/{cfg.name}/{version.version}"
    print(f"registered {uri} as {cfg.name} version {version.version}; load it with {where}")
    return {"name": cfg.name, "version": version.version, "uri": where}
