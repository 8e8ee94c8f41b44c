"""``gmeta register``: put a run's model in the MLflow model registry and point an alias at it.

    gmeta register --run RUN_ID --name melu --alias champion
"""

from __future__ import annotations

from gmeta.trainer.parallel.launch import run_guarded
from gmeta.trainer.tracking.mlflow_run import add_tracking_arguments
from gmeta.trainer.tracking.registry import RegisterConfig, register


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="MLflow run id of a gmeta train run")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default="", help="alias to point at the new version (e.g. champion)")
    add_tracking_arguments(p)


def main(args) -> int:
    cfg = RegisterConfig(run=args.run, name=args.name, alias=args.alias, tracking_uri=args.tracking_uri)
    return run_guarded(lambda: register(cfg) and 0)
