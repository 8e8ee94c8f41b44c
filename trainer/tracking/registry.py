"""The MLflow model registry: a run's logged model as a new version of a registered model, and
an alias pointed at it (``gmeta register``, ``gmeta train --register-as``, ``gmeta promote``)."""

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

    uri = model_uri_of_run(cfg.run, cfg.tracking_uri)
    version = mlflow.register_model(uri, cfg.name)
    if cfg.alias:
        set_alias(cfg.name, cfg.alias, version.version, cfg.tracking_uri)
    where = f"models:/{cfg.name}@{cfg.alias}" if cfg.alias else f"models:/{cfg.name}/{version.version}"
    print(f"registered {uri} as {cfg.name} version {version.version}; load it with {where}")
    return {"name": cfg.name, "version": version.version, "uri": where}


def set_alias(name: str, alias: str, version, tracking_uri: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)


def version_behind_alias(name: str, alias: str, tracking_uri: str):
    """The ``ModelVersion`` that ``models:/NAME@ALIAS`` points at; None when the model is not
    registered or the alias is not set (any other failure of the store is raised)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # sqlite and server stores: an unknown model is RESOURCE_DOES_NOT_EXIST, an unset alias
        # INVALID_PARAMETER_VALUE ("alias ... not found")
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc):
            return None
        raise


def finished_run(run_id: str, tracking_uri: str):
    """The MLflow run of a ``gmeta train`` that ended well (status FINISHED) and logged its model:
    ``(run, model URI)``. A failed, killed or still running run is refused, naming its status."""
    from mlflow import MlflowClient

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for unknown runs
        raise ValueError(f"--run {run_id}: no such run in {tracking_uri} ({type(exc).__name__})") from None
    if run.info.status != "FINISHED":
        raise ValueError(f"--run {run_id}: its MLflow run is {run.info.status}, not FINISHED; a failed, killed or "
                         f"unfinished run is never promoted: wait for it to finish, or resume it (gmeta train "
                         f"... --resume) or train again")
    return run, model_uri_of_run(run_id, tracking_uri)


def record_on_version(name: str, version, tags: dict, description: str, tracking_uri: str) -> None:
    """Tags (strings) and a description on one model version."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    client.update_model_version(name, str(version), description=description)
