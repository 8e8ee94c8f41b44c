"""gmeta.trainer: the commands over the parts of a training run.

Commands (flags, one frozen config, main): train, evaluate, tune, predict, register, promote,
compare.
The parts, lowest first: a part imports only those before it in ``LAYERS`` (and gmeta.io,
gmeta.models); a command imports any (``tests/test_layout.py`` checks both).
  parallel    the communicator (the only Horovod import), the guarded process launcher, stop
              signals, fault points
  embedding   the sharding plan, the embedding backends (hybrid, naive, tiered, SOK), row-wise
              optimizers, tiering, building a plan's tables
  evaluation  metrics, baselines, the keys of evaluation rows, per-split reports, the support
              curve, plots, the champion/challenger rule
  meta        the meta-learner (one meta-step), the dense optimizer, extra training phases, the
              run state by name
  serving     export, the SavedModel, the serving runtime and the MLflow pyfunc model
  tracking    MLflow runs (the Tracker), the model registry, run facts (tags, dataset inputs)
  config      the run's frozen config: every setting of gmeta train with its default, once
  checkpoint  checkpoints: the file format, shard assembly, resume and init-from
  run         one training run: its context, input, loop, signals, early stopping, elastic resets
  tuning      gmeta tune's search space, argv round trip, trials and study
"""

LAYERS = ("parallel", "embedding", "evaluation", "meta", "serving", "tracking", "config", "checkpoint", "run",
          "tuning")
COMMANDS = ("train", "evaluate", "tune", "predict", "register", "promote", "compare")
