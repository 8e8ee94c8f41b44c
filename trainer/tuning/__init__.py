"""gmeta tune's parts: ``space`` (the search spaces, sampling a point, putting it into a config),
``argv`` (a TrainConfig as ``gmeta train`` arguments and back), ``trials`` (a trial's config, its
run in process or under horovodrun, the objective), ``mlflow_study`` (the study's MLflow parent
run and trial children), ``study`` (the Optuna study and its pruner) and ``summary`` (the best
trial, how far it can be trusted, the trials table). Imports config, evaluation, parallel, run."""
