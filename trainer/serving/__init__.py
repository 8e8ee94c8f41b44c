"""Serving what was meta-learned: ``export`` (a run's model as plain files, loaded back),
``savedmodel`` (the SavedModel that adapts in the graph), ``runtime`` (rows in, scores out; no
gmeta imports: it ships inside the MLflow model) and ``pyfunc`` (the MLflow model's code).
Imports meta, embedding, parallel."""
