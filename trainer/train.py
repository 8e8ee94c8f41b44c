"""``gmeta train``: meta-train a zoo model on a Meta-IO dataset, evaluate, log to MLflow.

Run on one process, or on many with ``horovodrun -np N -H host:N --gloo gmeta train ...``. The
flags are the fields of ``gmeta.trainer.config.TrainConfig``; the run is
``gmeta.trainer.run.training.train``. The last line printed (rank 0) is one JSON object: the run
id, per evaluation split the headline metrics, and the path of the full report (README, "What a
run reports").
"""

from __future__ import annotations

from gmeta.trainer.config import add_arguments, config_from_args
from gmeta.trainer.parallel.launch import run_guarded
from gmeta.trainer.run.training import train

__all__ = ["add_arguments", "main"]


def main(args) -> int:
    return run_guarded(lambda: train(config_from_args(args)) and 0)
