"""``gmeta tune``: hyper-parameter search (Optuna) over a zoo model's search space.

Each trial is one ``gmeta train`` run with sampled flags; its value is the **validation GAUC
adapted** that the run reports for the validation split at the end, i.e. the model after its
last epoch (and after the model's extra phases, e.g. MetaEmb's generator training; for the other
models this equals the last epoch's value). It is exactly the number the printed ``gmeta train``
command reports for that split. The study maximises it.

* Study: stored in ``--storage`` (default ``sqlite:///optuna.db`` in the working directory) under
  ``--study-name`` (default ``MODEL-DATASET``); running the command again resumes it and adds
  ``--n-trials`` more trials. TPE sampler seeded by ``--seed`` (plus the number of earlier trials
  when the study resumes, so the random start-up draws are not repeated).
* Pruning (in-process trials only): ``train`` evaluates the validation split after every epoch
  and calls back; the epoch's GAUC adapted is reported to the trial and a MedianPruner (no
  pruning before ``--prune-warmup-epochs`` epochs, nor before ``--prune-startup-trials`` trials
  have completed) may stop it; ``--prune-below X`` also stops any trial under X after the
  warm-up. A pruned trial's MLflow run ends KILLED with tag ``gmeta.tune.state=PRUNED``.
* ``--workers N`` (N > 1): each trial runs as ``horovodrun -np N -H localhost:N --gloo gmeta
  train ...``; the epochs are not reported back while it runs, so nothing is pruned (the
  per-epoch validation curve is read from MLflow afterwards and recorded on the trial).
* MLflow: one parent run per study (tags ``gmeta.tune.study``, ``gmeta.tune.role=parent``;
  reused when the study resumes), and every trial's run is its child (tag
  ``mlflow.parentRunId``, set at creation through MLflow's ``MLFLOW_RUN_CONTEXT`` environment
  variable, so it works in-process and under horovodrun alike), tagged ``gmeta.tune.trial``.
* Output: a table of trials on stderr, the best value and one ``gmeta train`` command line that
  reruns the best trial (every tuned flag spelled out), and, as the last stdout line, one JSON
  object ``{best_value, best_params, command, n_trials, n_pruned, ...}``.

The search space (``SHARED_SPACE`` plus ``MODEL_SPACES[model]``) is listed by ``gmeta tune
--help``. ``--params`` tunes a subset; ``--set KEY=VALUE`` holds any other ``TrainConfig`` field
fixed (a searched field given with ``--set`` leaves the search).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass

from gmeta.io.schema import Schema
from gmeta.models.registry import MODELS
from gmeta.trainer.config import AUTO, TrainConfig, parse_auto_int as _size, validation_split
from gmeta.trainer.parallel.launch import launched_by_horovodrun, run_guarded
from gmeta.trainer.parallel.signals import Stopped
from gmeta.trainer.tracking.mlflow_run import add_tracking_arguments
from gmeta.trainer.tuning.argv import config_from_argv, set_argv, train_parser
from gmeta.trainer.tuning.mlflow_study import StudyTracking
from gmeta.trainer.tuning.space import search_space, space_help
from gmeta.trainer.tuning.study import describe_pruner, open_study
from gmeta.trainer.tuning.summary import best_trial, print_trials, summarize
from gmeta.trainer.tuning.trials import OBJECTIVE, log, make_objective

DEFAULT_STORAGE = "sqlite:///optuna.db"


@dataclass(frozen=True)
class TuneConfig:
    base: object                    # TrainConfig: everything held fixed
    validation: str                 # the resolved validation split (the objective's)
    space: tuple                    # Params searched
    storage: str = DEFAULT_STORAGE
    study_name: str = ""
    study_dir: str = ""
    n_trials: int | None = 20
    timeout: float | None = None
    seed: int = 0
    pruner: str = "median"
    prune_warmup_epochs: int = 1
    prune_startup_trials: int = 5
    prune_below: float | None = None
    workers: int = 1

    @property
    def in_process(self) -> bool:
        return self.workers <= 1


def default_study_name(model: str, data: str) -> str:
    base = os.path.basename(data.rstrip("/")) or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{base}")


def add_arguments(p) -> None:
    d = TrainConfig(model="", data="")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = space_help() + (
        "\n\nobjective: " + OBJECTIVE + ", maximised; the value of a trial is what the rerun command "
        "reports for the validation split.\nmetaemb also searches its generator's extra.alpha and "
        "extra.warmup_lr (--extra alpha=..).")
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="zoo model")
    p.add_argument("--data", required=True, help="dataset directory (local or hdfs://) with schema.json")
    p.add_argument("--epochs", type=_size, default=d.epochs, help="epochs of every trial (auto: as gmeta train)")
    p.add_argument("--validation-split", default=d.validation_split,
                   help="the split the objective is measured on; auto: 'val' when the dataset has one "
                        "(required: a dataset without it needs an explicit split, e.g. user_cold)")
    add_tracking_arguments(p, d.experiment)  # a parent run for the study, a child run per trial
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="set_",
                   help="hold a TrainConfig field fixed for every trial (e.g. tasks_per_batch=16, "
                        "adapt=head, extra.alpha=0.2); a searched field given here leaves the search")
    p.add_argument("--params", default="", help="comma separated subset of the search space to tune (default: all)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="Optuna storage URL; the study resumes from it (default: optuna.db in the working dir)")
    p.add_argument("--study-name", default="", help="default: MODEL-DATASET (the dataset directory's name)")
    p.add_argument("--study-dir", default="", help="where trials write their exports (default: tune/STUDY_NAME)")
    p.add_argument("--n-trials", type=int, default=20, help="trials to add in this invocation")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--seed", type=int, default=0,
                   help="TPE sampler seed; a resumed study uses seed + its number of trials, so it does not "
                        "repeat earlier draws (the training seed is --set seed=N)")
    p.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="median: stop a trial whose validation GAUC at an epoch is below the median of "
                        "earlier trials at that epoch (in-process trials only)")
    p.add_argument("--prune-warmup-epochs", type=int, default=1,
                   help="epochs every trial completes before it may be pruned")
    p.add_argument("--prune-startup-trials", type=int, default=5,
                   help="completed trials before the median pruner starts pruning")
    p.add_argument("--prune-below", type=float, default=None,
                   help="also prune a trial whose validation GAUC after the warm-up is below this")
    p.add_argument("--workers", type=int, default=1,
                   help="1: trials run in this process (pruning on); N > 1: each trial runs under "
                        "horovodrun -np N -H localhost:N --gloo (no pruning: epochs are not reported back)")


def config_from_args(args) -> TuneConfig:
    if launched_by_horovodrun():
        raise ValueError("run gmeta tune as one process (not under horovodrun); --workers N launches "
                         "each trial on N workers")
    for ok, message in ((args.epochs == AUTO or args.epochs >= 1,
                         "--epochs must be auto or >= 1 (the objective is measured after each epoch)"),
                        (args.n_trials >= 1, "--n-trials must be >= 1"),
                        (args.timeout is None or args.timeout > 0, "--timeout must be > 0"),
                        (args.workers >= 1, "--workers must be >= 1"),
                        (args.prune_warmup_epochs >= 0, "--prune-warmup-epochs must be >= 0"),
                        (args.prune_startup_trials >= 0, "--prune-startup-trials must be >= 0")):
        if not ok:
            raise ValueError(message)
    parser = train_parser()
    fixed_argv, fixed = set_argv(args.set_, parser)
    base = config_from_argv(["--model", args.model, "--data", args.data, "--epochs", str(args.epochs),
                             "--validation-split", args.validation_split, "--tracking-uri", args.tracking_uri,
                             "--experiment", args.experiment, *fixed_argv], parser)
    schema = Schema.load(base.data)
    val = validation_split(base, schema)
    if not val:
        raise ValueError(f"gmeta tune needs a validation split to score trials: the dataset {base.data} has "
                         f"splits {list(schema.splits)} and no 'val'; pass --validation-split SPLIT "
                         f"(e.g. one of {[s for s in schema.splits if s != 'train']})")
    names = tuple(n.strip() for n in args.params.split(",") if n.strip())
    space = search_space(base.model, names, fixed)
    if not space:
        raise ValueError("nothing to tune: every searched parameter is held fixed by --set or left out by --params")
    study_name = args.study_name or default_study_name(base.model, base.data)
    return TuneConfig(base=base, validation=val, space=space, storage=args.storage, study_name=study_name,
                      study_dir=args.study_dir or os.path.join("tune", study_name), n_trials=args.n_trials,
                      timeout=args.timeout, seed=args.seed, pruner=args.pruner,
                      prune_warmup_epochs=args.prune_warmup_epochs, prune_startup_trials=args.prune_startup_trials,
                      prune_below=args.prune_below, workers=args.workers)


def main(args) -> int:
    return run_guarded(lambda: tune(config_from_args(args)))


def tune(cfg: TuneConfig, pruner=None) -> int:
    """Run (or resume) the study; print the trials, the best trial and its rerun command."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO)
    study = open_study(cfg, pruner)
    done = len(study.trials)
    log(f"study {cfg.study_name!r} in {cfg.storage}: {done} earlier trial(s); adding up to {cfg.n_trials}"
        + (f" within {cfg.timeout:g} s" if cfg.timeout else "") + f"; objective: {OBJECTIVE} on "
        f"{cfg.validation!r}, {cfg.base.epochs} epoch(s) per trial; searching "
        + ", ".join(p.name for p in cfg.space))
    if cfg.in_process:
        log(f"trials run in this process; pruner: {describe_pruner(cfg) if pruner is None else type(pruner).__name__}")
        if pruner is None and cfg.base.epochs != "auto" and cfg.base.epochs <= cfg.prune_warmup_epochs and describe_pruner(cfg) != "none":
            log(f"--epochs {cfg.base.epochs} <= --prune-warmup-epochs {cfg.prune_warmup_epochs}: nothing can be pruned")
    else:
        log(f"--workers {cfg.workers}: each trial runs under horovodrun -np {cfg.workers}; pruning is not "
            "available in this mode (epochs are not reported back while a trial runs)")
    tracking = StudyTracking(cfg, study)
    failures: list = []
    objective, fail_types = make_objective(cfg, tracking, failures)

    def after(study_, trial) -> None:
        tracking.after_trial(trial, best_trial(study_))
        # a study whose every trial failed, 3 of them in this run, has a setup problem: stop
        if sum(t.number >= done for t in study_.trials) >= 3 and \
                all(t.state == optuna.trial.TrialState.FAIL for t in study_.trials):
            log("every trial so far failed (3 in this run); stopping: check the errors above")
            study_.stop()

    status = "FAILED"
    try:
        study.optimize(objective, n_trials=cfg.n_trials, timeout=cfg.timeout, catch=fail_types,
                       callbacks=[after], gc_after_trial=True)
        status = "FINISHED"
    except (KeyboardInterrupt, Stopped):  # Ctrl-C, or a pre-empted trial (SIGTERM): the study stops
        status = "KILLED"
        raise
    finally:
        summary = None
        try:
            summary = summarize(cfg, study)
        finally:
            tracking.finish(summary, status)
    print_trials(study, sys.stderr)
    if summary is None:
        raise RuntimeError(f"no trial of study {cfg.study_name!r} completed"
                           + (f"; last failure: {failures[-1]}" if failures else ""))
    lo, hi = summary.get("best_interval") or (None, None)
    print(f"best trial {summary['best_trial']}: {OBJECTIVE} = {summary['best_value']:.5f}"
          + (f" [95% interval over {summary.get('validation_tasks')} tasks: {lo:.4f}, {hi:.4f}]" if lo is not None else ""),
          file=sys.stderr)
    for warning in summary["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"rerun it: {summary['command']}", file=sys.stderr, flush=True)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0
