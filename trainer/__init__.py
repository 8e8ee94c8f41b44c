"""gmeta.trainer: the commands over the parts of a training run.

Commands (flags, one frozen config, main): train, evaluate, tune, predict, register, compare.
Packages, lowest first (a package imports only those above it in this list, and the commands
import any):
  parallel    the communicator (the only Horovod import) and the guarded process launcher
  embedding   the sharding plan, the embedding backends (hybrid, naive, tiered, SOK), row-wise
              optimizers, tiering, building a plan's tables
  meta        the meta-learner (one meta-step), the dense optimizer, extra training phases, the
              run state by name
  evaluation  metrics, baselines, per-split reports, the support curve, plots
  tracking    MLflow runs (the Tracker) and run facts (tags, dataset inputs)
  serving     export, the SavedModel, the serving runtime and the MLflow pyfunc model
  checkpoint  checkpoints: the file format, shard assembly, resume and init-from
  run         the training loop, signals, early stopping
  tuning      gmeta tune's search spaces, trials and study
"""
