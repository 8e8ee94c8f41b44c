"""MLflow: ``mlflow_run`` (the Tracker of a run: params, metrics, artifacts, the model, status,
fallback store), ``registry`` (model versions, aliases, what is recorded on a version) and
``run_info`` (tags, versions, the dataset as the run's input and where it was read). Imports no
other part of gmeta.trainer but serving (the model it logs) and parallel (Horovod's version)."""
