"""MLflow: ``mlflow_run`` (the Tracker of a run: params, metrics, artifacts, the model, status,
fallback store) and ``run_info`` (tags, versions, the dataset as the run's input). Imports no
other part of gmeta.trainer but serving (the model it logs) and parallel (Horovod's version)."""
