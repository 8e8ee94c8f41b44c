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
import contextlib
import dataclasses
import glob
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

from gmeta.io.schema import Schema
from gmeta.models.registry import MODELS
from gmeta.trainer import config
from gmeta.trainer.config import AUTO, TrainConfig, config_dict, parse_auto_int as _size, validation_split
from gmeta.trainer.evaluation.metrics import paired_difference
from gmeta.trainer.evaluation.report import load_per_task
from gmeta.trainer.parallel.launch import run_guarded
from gmeta.trainer.run.loop import TrainingDiverged
from gmeta.trainer.run.signals import Stopped
from gmeta.trainer.run.training import train
from gmeta.trainer.tracking.mlflow_run import add_tracking_arguments

DEFAULT_STORAGE = "sqlite:///optuna.db"
OBJECTIVE = "validation GAUC adapted (final model, validation split)"


# ------------------------------------------------------------------------------------------------
# search spaces


@dataclass(frozen=True)
class Param:
    """One searched hyper-parameter: a TrainConfig field, or ``extra.KEY`` (``--extra KEY=...``).

    kind: ``float`` / ``int`` in [low, high] (``log`` scale optional; ``off`` adds one more value,
    e.g. clip_norm 0 = off, sampled half of the time), ``bool``, or ``choice`` among ``choices``
    (comma separated strings for tuple fields such as hidden and adapt).
    ``requires_field``: the entry is skipped while TrainConfig has no such field.
    """
    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()
    off: float | None = None
    requires_field: str = ""

    def describe(self) -> str:
        if self.kind in ("float", "int"):
            rng = f"{self.low:g}..{self.high:g}" + (" log" if self.log else "")
            return rng if self.off is None else f"{self.off:g} (off) or {rng}"
        if self.kind == "bool":
            return "false | true"
        return " | ".join(str(c) for c in self.choices)


SHARED_SPACE = (
    Param("inner_solver", "choice", choices=("ridge", "gradient")),
    Param("ridge_lambda", "float", 0.03, 10.0, log=True),
    Param("plain_loss_weight", "float", 0.0, 2.0),
    Param("inner_lr", "float", 0.01, 1.0, log=True),
    Param("inner_steps", "int", 1, 5),
    Param("outer_lr", "float", 1e-3, 3e-2, log=True),
    Param("emb_lr", "float", 0.02, 0.5, log=True),
    Param("meta_sgd", "bool"),
    Param("first_order", "bool"),
    Param("hidden", "choice", choices=("32,32", "64,64", "128,64", "64")),
    Param("emb_dim", "choice", choices=(8, 16, 32)),
    Param("clip_norm", "float", 1.0, 10.0, log=True, off=0.0),
    # --adapt (what the inner loop adapts, gmeta.models.base.ADAPT_PARTS). Skipped automatically
    # while TrainConfig has no `adapt` field; the choices are valid combinations (head and last
    # exclude each other).
    Param("adapt", "choice", requires_field="adapt",
          choices=("head", "last", "head,bias", "last,bias", "last,user", "last,pref,bias",
                   "head,user,pref,bias", "user,pref,bias")),
)

MODEL_SPACES = {
    "melu": SHARED_SPACE,
    "maml_dnn": SHARED_SPACE,
    "maml_esmm": SHARED_SPACE,
    "metaemb": SHARED_SPACE + (
        Param("extra.alpha", "float", 0.05, 0.9),            # generator: weight of the cold loss
        Param("extra.warmup_lr", "float", 0.01, 1.0, log=True),  # generator: warm-up step size
    ),
}


def search_space(model: str, names=None, fixed=()) -> tuple:
    """The model's searched parameters: entries whose field exists, restricted to ``names`` when
    given, minus the ``fixed`` ones (held by ``--set``)."""
    if model not in MODEL_SPACES:
        raise ValueError(f"gmeta tune has no search space for --model {model!r}; known: {sorted(MODEL_SPACES)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    space = [p for p in MODEL_SPACES[model]
             if not p.requires_field or p.requires_field in fields]
    if names:
        known = {p.name for p in space}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--params {','.join(unknown)}: not in {model}'s search space {sorted(known)}")
        space = [p for p in space if p.name in names]
    return tuple(p for p in space if p.name not in fixed)


def space_help() -> str:
    lines = ["search space (--params restricts it; --set KEY=VALUE holds a field fixed):"]
    for p in SHARED_SPACE:
        note = f"  [only while TrainConfig has '{p.requires_field}']" if p.requires_field else ""
        lines.append(f"  {p.name:<14} {p.describe()}{note}")
    for model, space in MODEL_SPACES.items():
        extra = [p for p in space if p not in SHARED_SPACE]
        for p in extra:
            lines.append(f"  {p.name:<14} {p.describe()}  [{model} only]")
    return "\n".join(lines)


def suggest(trial, space) -> dict:
    """Sample the space; returns {param name: config value} (tuples for tuple fields)."""
    values = {}
    for p in space:
        if p.kind == "bool":
            values[p.name] = trial.suggest_categorical(p.name, [False, True])
        elif p.kind == "choice":
            values[p.name] = _choice_value(p.name, trial.suggest_categorical(p.name, list(p.choices)))
        else:
            if p.off is not None and not trial.suggest_categorical(f"{p.name}_on", [False, True]):
                values[p.name] = p.off
                continue
            if p.kind == "int":
                values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            else:
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
    return values


def _choice_value(name: str, choice):
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}.get(name)
    if isinstance(default, tuple) and isinstance(choice, str):
        kind = type(default[0]) if default else str
        return tuple(kind(c.strip()) for c in choice.split(",") if c.strip())
    return choice


def apply_values(cfg, values: dict):
    """``cfg`` with the sampled values (``extra.KEY`` go into ``cfg.extra``)."""
    plain = {k: v for k, v in values.items() if not k.startswith("extra.")}
    extra = {k[len("extra."):]: v for k, v in values.items() if k.startswith("extra.")}
    if extra:
        plain["extra"] = {**cfg.extra, **extra}
    return dataclasses.replace(cfg, **plain)


def jsonable(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# ------------------------------------------------------------------------------------------------
# gmeta train's flags: the one parser, used to build base configs and to print commands


class _TrainParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"gmeta train flags: {message}")


def train_parser() -> argparse.ArgumentParser:
    p = _TrainParser(prog="gmeta train", add_help=False)
    config.add_arguments(p)
    return p


def _actions(parser) -> dict:
    return {a.dest: a for a in parser._actions if a.option_strings}


def _flag(action) -> str:
    return max((s for s in action.option_strings if s.startswith("--")), key=len)


def _text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _extra_text(value) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value)


def _field_argv(action, name: str, value) -> list:
    flag = _flag(action)
    if name == "extra":
        return [a for k, v in sorted(value.items()) for a in (flag, f"{k}={_extra_text(v)}")]
    if isinstance(value, bool):
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        if isinstance(action, argparse._StoreTrueAction):
            return [flag] if value else []
        if isinstance(action, argparse._StoreFalseAction):
            return [] if value else [flag]
    return [flag, _text(value)]


_ENV_DEFAULTS = ("tracking_uri", "experiment")  # gmeta.trainer.tracking.mlflow_run.add_tracking_arguments


def config_argv(cfg, parser=None, force=()) -> list:
    """``gmeta train`` arguments that rebuild ``cfg``: model, data, every field that differs from
    its default, and the ``force``d fields (tuned ones) even when they equal it."""
    parser = parser or train_parser()
    actions = _actions(parser)
    default = TrainConfig(model="", data="")
    argv = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        action = actions.get(f.name)
        # a flag whose default comes from the environment (MLFLOW_TRACKING_URI, ...) is written
        # out unless it equals that default too: the command must mean the same in another shell
        env_default = f.name in _ENV_DEFAULTS and action is not None and value != action.default
        if (f.name not in ("model", "data") and f.name not in force and value == getattr(default, f.name)
                and not env_default):
            continue
        if action is None:
            raise ValueError(f"TrainConfig.{f.name} has no gmeta train flag")
        argv += _field_argv(action, f.name, value)
    return argv


def config_from_argv(argv, parser=None):
    return config.config_from_args((parser or train_parser()).parse_args(argv))


def rerun_command(cfg, tuned) -> str:
    """One ``gmeta train`` command line that rebuilds ``cfg`` (checked by parsing it back)."""
    parser = train_parser()
    argv = config_argv(cfg, parser, force={n for n in tuned if not n.startswith("extra.")})
    back = config_from_argv(argv, parser)
    if back != cfg:
        diff = [f.name for f in dataclasses.fields(cfg) if getattr(back, f.name) != getattr(cfg, f.name)]
        raise RuntimeError(f"the rerun command does not reproduce the trial's config (fields {diff})")
    return shlex.join(["gmeta", "train", *argv])


# tune's own flags (and fields it manages per trial) cannot be --set
_OWN = {"model": "--model", "data": "--data", "epochs": "--epochs", "validation_split": "--validation-split",
        "tracking_uri": "--tracking-uri", "experiment": "--experiment"}
_MANAGED = ("run_name", "output_dir", "eval_splits", "plain_baseline", "comm", "saved_model", "support_curve")


def set_argv(items, parser) -> tuple:
    """``--set KEY=VALUE`` items -> (gmeta train arguments, the field names they fix)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    actions = _actions(parser)
    argv, fixed = [], []
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key.startswith("extra."):
            argv += ["--extra", f"{key[len('extra.'):]}={value}"]
            fixed.append(key)
            continue
        if key in _OWN:
            raise ValueError(f"--set {key}: use gmeta tune's {_OWN[key]} flag")
        if key in _MANAGED:
            raise ValueError(f"--set {key}: gmeta tune sets it for every trial (eval_splits = the validation "
                             "split, plain_baseline off, comm local in-process, run_name and output_dir per trial)")
        if key not in fields or key not in actions:
            raise ValueError(f"--set {key}: not a TrainConfig field with a gmeta train flag")
        action = actions[key]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--set {key}={value}: expected true or false")
            argv += _field_argv(action, key, low in ("true", "1", "yes"))
        elif key == "extra":
            argv += ["--extra", value]
        else:
            argv += [_flag(action), value]
        fixed.append(key)
    return argv, tuple(fixed)


# ------------------------------------------------------------------------------------------------
# config


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
    if any(k in os.environ for k in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
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


def log(message: str) -> None:
    print(f"[gmeta tune] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# MLflow: a parent run per study, a child run per trial


class StudyTracking:
    """The study's parent run (created, or reused when the study resumes) and its children."""

    ROLE, STUDY, TRIAL, STATE = "gmeta.tune.role", "gmeta.tune.study", "gmeta.tune.trial", "gmeta.tune.state"

    def __init__(self, cfg: TuneConfig, study):
        self.enabled = bool(cfg.base.tracking_uri)
        self.parent_id = None
        if not self.enabled:
            return
        from mlflow import MlflowClient

        with contextlib.redirect_stdout(sys.stderr):
            self.client = client = MlflowClient(cfg.base.tracking_uri)
            exp = client.get_experiment_by_name(cfg.base.experiment)
            self.exp_id = exp_id = exp.experiment_id if exp else client.create_experiment(cfg.base.experiment)
            known = study.user_attrs.get("mlflow_parent_run_id")
            if known:
                try:
                    run = client.get_run(known)
                    if run.info.experiment_id == exp_id and run.info.lifecycle_stage == "active":
                        self.parent_id = known
                        client.update_run(known, status="RUNNING")
                except Exception:  # noqa: BLE001 - another tracking store, or a deleted run: start anew
                    self.parent_id = None
            if self.parent_id is None:
                run = client.create_run(exp_id, run_name=cfg.study_name,
                                        tags={self.ROLE: "parent", self.STUDY: cfg.study_name})
                self.parent_id = run.info.run_id
                study.set_user_attr("mlflow_parent_run_id", self.parent_id)
            client.set_tag(self.parent_id, "gmeta.tune.objective", OBJECTIVE)
            client.log_dict(self.parent_id, {"base": _config_json(cfg.base), "validation_split": cfg.validation,
                                             "space": [dataclasses.asdict(p) for p in cfg.space]},
                            "tune_config.json")
        log(f"MLflow: parent run {self.parent_id} in experiment {cfg.base.experiment!r}")

    def child_env(self, study_name: str, number: int) -> dict:
        """MLFLOW_RUN_CONTEXT: tags MLflow adds to every run a process starts (the trial's)."""
        if not self.enabled:
            return {}
        tags = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
        tags.update({"mlflow.parentRunId": self.parent_id, self.STUDY: study_name, self.TRIAL: str(number)})
        return {"MLFLOW_RUN_CONTEXT": json.dumps(tags)}

    def child(self, number: int):
        if not self.enabled:
            return None
        runs = self.client.search_runs(
            [self.exp_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{self.TRIAL}` = '{number}'",
            max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def mark(self, number: int, state: str):
        """Tag the trial's run with its Optuna state (a pruned run ends KILLED); returns its id."""
        run = self.child(number)
        if run is None:
            return None
        self.client.set_tag(run.info.run_id, self.STATE, state)
        if state == "PRUNED":
            self.client.set_terminated(run.info.run_id, status="KILLED")
        return run.info.run_id

    def metric_history(self, run_id: str, key: str) -> list:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def after_trial(self, trial, best) -> None:
        if not self.enabled:
            return
        if trial.value is not None:
            self.client.log_metric(self.parent_id, "trial_value", trial.value, step=trial.number)
        if best is not None:
            self.client.log_metric(self.parent_id, "best_value", best.value, step=trial.number)

    def finish(self, summary: dict | None, status: str) -> None:
        if not self.enabled:
            return
        with contextlib.redirect_stdout(sys.stderr):
            if summary:
                self.client.log_dict(self.parent_id, summary, "tune_summary.json")
                self.client.set_tag(self.parent_id, "gmeta.tune.best_trial", str(summary["best_trial"]))
                self.client.set_tag(self.parent_id, "gmeta.tune.command", summary["command"][:5000])
                for k, v in summary["best_params"].items():
                    self.client.set_tag(self.parent_id, f"best.{k}", json.dumps(v))
            self.client.set_terminated(self.parent_id, status=status)


def _config_json(cfg) -> dict:
    return json.loads(json.dumps(config_dict(cfg), default=str))


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------
# trials


class TrialFailed(RuntimeError):
    """A trial that ran but produced no value (its run failed, or the GAUC is undefined)."""


def trial_config(cfg: TuneConfig, values: dict, number: int):
    """The full config of trial ``number``: base + sampled values + per-trial settings that keep it
    cheap (only the validation split evaluated, no plain network, no support curve) and separate."""
    tcfg = apply_values(cfg.base, values)
    tcfg = dataclasses.replace(
        tcfg, validation_split=cfg.validation, eval_splits=(cfg.validation,), plain_baseline="off", saved_model=False,
        support_curve="none",
        output_dir=os.path.join(cfg.study_dir, f"trial-{number}"), run_name=f"{cfg.study_name}-trial-{number}",
        comm="local" if cfg.in_process else tcfg.comm)
    return tcfg.validate()


#: fewer validation tasks than this cannot rank trials that differ by a few thousandths of GAUC
MIN_VALIDATION_TASKS = 200
BASELINES = ("unadapted", "item_mean", "item_knn")


def _final_value(results: dict, split: str, trial=None) -> float:
    """The objective from a trial's final report; its interval, task count and the validation
    baselines' GAUC go to the trial's attributes (the summary reports and checks them)."""
    report = results.get(split) or {}
    value = report.get("gauc_adapted")
    if value is None or not math.isfinite(value):
        raise TrialFailed(f"the validation GAUC adapted on {split!r} is undefined (no task with both classes?)")
    head = next((h for h, sec in report.items() if isinstance(sec, dict) and isinstance(sec.get("adapted"), dict)),
                None)
    if trial is not None and head is not None:
        section = report[head]
        gauc = section["adapted"]["gauc"]
        trial.set_user_attr("objective_interval", [gauc.get("lo"), gauc.get("hi")])
        trial.set_user_attr("validation_tasks", report.get("tasks"))
        trial.set_user_attr("baselines", {b: section[b]["gauc"]["value"] for b in BASELINES if b in section})
        trial.set_user_attr("baseline_differences", {
            b: {k: d.get(k) for k in ("diff", "lo", "hi", "significant")}
            for b, d in ((b, section.get("differences", {}).get(b, {}).get("gauc", {})) for b in BASELINES) if d})
    return float(value)


def run_in_process(tcfg, trial, split: str) -> float:
    """``train`` in this process; every epoch's validation GAUC goes to the trial, which may prune."""
    import optuna

    def on_epoch(epoch: int, report) -> None:
        value = None if report is None else report.get("gauc_adapted")
        if value is None or not math.isfinite(value):
            return
        trial.report(float(value), epoch)
        if trial.should_prune():
            log(f"trial {trial.number} pruned after epoch {epoch} (validation GAUC adapted {value:.4f})")
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    # train prints its results JSON (and MLflow its links) on stdout: ours must stay alone there,
    # and the results are returned anyway
    with contextlib.redirect_stdout(io.StringIO()):
        results = train(tcfg, on_epoch=on_epoch)
    return _final_value(results, split, trial)


def horovodrun_command(tcfg, workers: int) -> list:
    bindir = os.path.dirname(sys.executable)
    hvd = os.path.join(bindir, "horovodrun")
    hvd = hvd if os.path.exists(hvd) else shutil.which("horovodrun")
    if not hvd:
        raise FileNotFoundError("--workers needs horovodrun (pip install horovod), not found on PATH")
    return [hvd, "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
            sys.executable, "-m", "gmeta.cli", "train", *config_argv(tcfg)]


def last_json(stdout: str) -> dict:
    """The last JSON object line of a (horovodrun-prefixed) stdout."""
    for line in reversed(stdout.strip().splitlines()):
        line = re.sub(r"^\[\d+\]<stdout>:", "", line).strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise TrialFailed("gmeta train printed no results JSON")


def run_under_horovodrun(tcfg, workers: int, split: str, env: dict, trial=None) -> float:
    cmd = horovodrun_command(tcfg, workers)
    full_env = dict(os.environ, **env)
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=full_env)  # stderr: ours, live
    if proc.returncode != 0:
        raise TrialFailed(f"horovodrun exited with {proc.returncode} (its workers' errors are above)")
    return _final_value(last_json(proc.stdout), split, trial)


def make_objective(cfg: TuneConfig, tracking: StudyTracking, failures: list):
    import optuna

    def objective(trial) -> float:
        values = suggest(trial, cfg.space)
        trial.set_user_attr("params", jsonable(values))
        tcfg = trial_config(cfg, values, trial.number)
        log(f"trial {trial.number}: " + " ".join(f"{k}={_show(v)}" for k, v in values.items()))
        env = tracking.child_env(cfg.study_name, trial.number)
        state = "FAIL"
        try:
            if cfg.in_process:
                with _environ(env):
                    value = run_in_process(tcfg, trial, cfg.validation)
            else:
                value = run_under_horovodrun(tcfg, cfg.workers, cfg.validation, env, trial)
            state = "COMPLETE"
            return value
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except (TrainingDiverged, TrialFailed) as exc:
            failures.append(f"trial {trial.number}: {exc}")
            trial.set_user_attr("error", str(exc)[:1000])
            log(f"trial {trial.number} failed: {exc}")
            raise
        finally:
            run_id = None
            try:
                run_id = tracking.mark(trial.number, state) if tracking.enabled else None
            except Exception as exc:  # noqa: BLE001 - bookkeeping must not hide the trial's outcome
                log(f"MLflow: could not tag trial {trial.number}'s run: {type(exc).__name__}: {exc}")
            if run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
                if not cfg.in_process and state == "COMPLETE":
                    # no live pruning under horovodrun; record the per-epoch curve afterwards
                    for step, v in tracking.metric_history(run_id, "val_gauc_adapted"):
                        trial.report(v, step)

    return objective, (TrainingDiverged, TrialFailed)


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v)


# ------------------------------------------------------------------------------------------------
# the study


def make_pruner(cfg: TuneConfig):
    import optuna

    pruners = []
    if cfg.pruner == "median":
        pruners.append(optuna.pruners.MedianPruner(n_startup_trials=cfg.prune_startup_trials,
                                                   n_warmup_steps=cfg.prune_warmup_epochs))
    if cfg.prune_below is not None:
        pruners.append(optuna.pruners.ThresholdPruner(lower=cfg.prune_below, n_warmup_steps=cfg.prune_warmup_epochs))
    if not pruners:
        return optuna.pruners.NopPruner()
    if len(pruners) == 1:
        return pruners[0]

    class AnyPruner(optuna.pruners.BasePruner):
        """Prune when any of the pruners says so (median, threshold)."""

        def prune(self, study, trial) -> bool:
            return any(p.prune(study, trial) for p in pruners)

    return AnyPruner()


def open_study(cfg: TuneConfig, pruner=None):
    import optuna

    study = optuna.create_study(study_name=cfg.study_name, storage=cfg.storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed),
                                pruner=pruner or make_pruner(cfg), load_if_exists=True)
    if study.trials:
        # a fresh sampler with the same seed would repeat the first trials' random start-up draws
        study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.trials))
    facts = {"model": cfg.base.model, "data": _norm_data(cfg.base.data), "validation_split": cfg.validation,
             "epochs": cfg.base.epochs}
    known = {k: study.user_attrs[k] for k in facts if k in study.user_attrs}
    clash = {k: (known[k], facts[k]) for k in known if known[k] != facts[k]}
    if clash:
        what = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in clash.items())
        raise ValueError(f"study {cfg.study_name!r} in {cfg.storage} was run with {what}; its values are not "
                         "comparable: use the same settings or another --study-name")
    for k, v in facts.items():
        if k not in known:
            study.set_user_attr(k, v)
    return study


def _norm_data(data: str) -> str:
    return data if "://" in data else os.path.abspath(data)


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
        tracking.after_trial(trial, _best(study_))
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


def describe_pruner(cfg: TuneConfig) -> str:
    parts = []
    if cfg.pruner == "median":
        parts.append(f"median (after {cfg.prune_startup_trials} completed trials and {cfg.prune_warmup_epochs} "
                     "warm-up epoch(s))")
    if cfg.prune_below is not None:
        parts.append(f"below {cfg.prune_below:g} after {cfg.prune_warmup_epochs} warm-up epoch(s)")
    return " or ".join(parts) or "none"


def _best(study):
    try:
        return study.best_trial
    except ValueError:
        return None


def summarize(cfg: TuneConfig, study) -> dict | None:
    from optuna.trial import TrialState

    best = _best(study)
    if best is None:
        return None
    params = best.user_attrs.get("params") or {}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    states = [t.state for t in study.trials]
    facts = trial_facts(cfg, study, best)
    return {"best_value": best.value, "best_params": params, "best_trial": best.number, **facts,
            "command": rerun_command(apply_values(cfg.base, values), tuple(values)),
            "n_trials": len(states), "n_pruned": states.count(TrialState.PRUNED),
            "n_complete": states.count(TrialState.COMPLETE), "n_failed": states.count(TrialState.FAIL),
            "study_name": cfg.study_name, "validation_split": cfg.validation, "objective": OBJECTIVE,
            "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}


def trial_facts(cfg: TuneConfig, study, best) -> dict:
    """How far the best trial can be trusted: its objective's interval, the validation baselines
    it must beat, and the runner-up's distance from it (paired over the validation tasks); the
    warnings say when the validation set is too small to rank trials or the winner loses to a
    baseline."""
    from optuna.trial import TrialState

    tasks = best.user_attrs.get("validation_tasks")
    facts = {"best_interval": best.user_attrs.get("objective_interval"), "validation_tasks": tasks,
             "baselines": best.user_attrs.get("baselines", {}),
             "best_minus_baselines": best.user_attrs.get("baseline_differences", {}), "warnings": []}
    warnings = facts["warnings"]
    lo, hi = facts["best_interval"] or (None, None)
    if tasks is not None and tasks < MIN_VALIDATION_TASKS:
        width = f" (the objective's 95% interval is {hi - lo:.3f} wide)" if lo is not None and hi is not None else ""
        warnings.append(f"the validation split {cfg.validation!r} has {tasks} tasks, fewer than "
                        f"{MIN_VALIDATION_TASKS}: too few to rank trials that differ by less than its interval"
                        f"{width}; write a larger validation split (gmeta convert --val-fraction, gmeta datagen "
                        "--val-users)")
    for name, d in facts["best_minus_baselines"].items():
        if d.get("diff") is not None and d["diff"] <= 0:
            warnings.append(f"the best trial does not beat {name} on {cfg.validation!r}: GAUC adapted minus "
                            f"{name} = {d['diff']:+.4f}" + (f" [{d['lo']:+.4f}, {d['hi']:+.4f}]" if d.get("lo") is not None else ""))
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE and t.number != best.number),
                      key=lambda t: t.value, reverse=True)
    if complete:
        runner = complete[0]
        facts["runner_up"] = {"trial": runner.number, "value": runner.value}
        diff = _paired_trials(cfg, best.number, runner.number)
        if diff is not None:
            facts["runner_up"]["best_minus_runner_up"] = diff
            if not diff["significant"]:
                warnings.append(f"the best trial is not distinguishable from trial {runner.number} on "
                                f"{cfg.validation!r}: {diff['diff']:+.4f} [{diff['lo']:+.4f}, {diff['hi']:+.4f}] "
                                "paired over the validation tasks")
    return facts


def _paired_trials(cfg: TuneConfig, a: int, b: int):
    """GAUC adapted of trial ``a`` minus trial ``b``, paired over the validation tasks, from the
    per-task arrays their runs saved (None when either is not on this machine)."""
    per_task = []
    for number in (a, b):
        found = sorted(glob.glob(os.path.join(cfg.study_dir, f"trial-{number}", "*", "per_task", f"{cfg.validation}.npz")))
        if not found:
            return None
        pt = load_per_task(found[-1])
        key = next((k for k in pt if k.endswith("/adapted")), None)
        if key is None:
            return None
        per_task.append(pt[key])
    d = paired_difference(per_task[0], per_task[1], "gauc")
    return {k: d[k] for k in ("diff", "lo", "hi", "significant", "tasks")}


def print_trials(study, out) -> None:
    rows = [("trial", "state", "value", "seconds", "params")]
    for t in study.trials:
        params = t.user_attrs.get("params") or t.params
        secs = t.duration.total_seconds() if t.duration else None
        rows.append((str(t.number), t.state.name, "" if t.value is None else f"{t.value:.5f}",
                     "" if secs is None else f"{secs:.1f}",
                     " ".join(f"{k}={_show(tuple(v) if isinstance(v, list) else v)}" for k, v in params.items())))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"trials of study {study.study_name!r}:", file=out)
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4], file=out)
    out.flush()
