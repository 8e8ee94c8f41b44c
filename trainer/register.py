"""``gmeta register``: put a run's model in the MLflow model registry and point an alias at it.

    gmeta register --run RUN_ID --name melu --alias champion
"""

from __future__ import annotations

from dataclasses import dataclass

from gmeta.trainer.parallel.launch import run_guarded


@dataclass(frozen=True)
class RegisterConfig:
    run: str
    name: str
    alias: str = ""
    tracking_uri: str = "sqlite:///mlflow.db"


def add_arguments(p) -> None:
    from gmeta.trainer.tracking.mlflow_run import add_tracking_arguments

    p.add_argument("--run", required=True, help="MLflow run id of a gmeta train run")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default="", help="alias to point at the new version (e.g. champion)")
    add_tracking_arguments(p)


def main(args) -> int:
    cfg = RegisterConfig(run=args.run, name=args.name, alias=args.alias, tracking_uri=args.tracking_uri)
    return run_guarded(lambda: register(cfg) and 0)


def register(cfg: RegisterConfig) -> dict:
    import mlflow
    from mlflow import MlflowClient

    from gmeta.trainer.tracking.mlflow_run import model_uri_of_run

    uri = model_uri_of_run(cfg.run, cfg.tracking_uri)
    version = mlflow.register_model(uri, cfg.name)
    if cfg.alias:
        MlflowClient(cfg.tracking_uri).set_registered_model_alias(cfg.name, cfg.alias, version.version)
    where = f"models:/{cfg.name}@{cfg.alias}" if cfg.alias else f"models:/{cfg.name}/{version.version}"
    print(f"registered {uri} as {cfg.name} version {version.version}; load it with {where}")
    return {"name": cfg.name, "version": version.version, "uri": where}
