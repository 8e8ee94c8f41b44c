"""One ``gmeta train`` run, top to bottom: set up, train, evaluate against the baselines, export, log.

``train(cfg)`` builds the run's context (communicator, data, learners, checkpoints, the MLflow
run, signal handling) and then, inside the signal handlers, ``_train`` (epochs with validation
and early stopping, the model's extra phases), ``_evaluate`` (every evaluation split and the
support curve) and ``_write`` (export, artifacts, the report). A failure or a stop marks the
MLflow run FAILED or KILLED from any surviving rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import tensorflow as tf

from gmeta.io import fs
from gmeta.io.plan import distinct_values
from gmeta.io.schema import Schema
from gmeta.trainer.checkpoint.run_checkpoints import RunCheckpoints
from gmeta.trainer.config import (
    AUTO,
    AUTO_MIN_EPOCHS,
    AUTO_MIN_STEPS,
    TrainConfig,
    auto_epochs,
    config_dict,
    resolve_sizes,
    validation_split,
)
from gmeta.trainer.embedding.factory import resolve_mode
from gmeta.trainer.evaluation import plots
from gmeta.trainer.evaluation.report import curve_metrics, headline, headline_metrics, print_report, save_per_task
from gmeta.trainer.evaluation.rows import heads_of
from gmeta.trainer.evaluation.splits import evaluate_splits, evaluation_splits, item_baselines
from gmeta.trainer.evaluation.support_curve import support_curve
from gmeta.trainer.meta.phases import run_phases
from gmeta.trainer.parallel.comm import elastic_launch, init_communicator
from gmeta.trainer.parallel.launch import check_visible, collective_aborted
from gmeta.trainer.run.build import build_learner, load_plain_baseline, plan_run_tiering
from gmeta.trainer.run.early_stopping import EarlyStopping
from gmeta.trainer.run.elastic import run_elastic
from gmeta.trainer.run.input import TrainInput
from gmeta.trainer.run.loop import fit
from gmeta.trainer.parallel.signals import Stopped, StopSignals
from gmeta.trainer.serving.export import export_model
from gmeta.trainer.serving.savedmodel import export_serving
from gmeta.trainer.tracking.mlflow_run import Tracker, mark_if_running
from gmeta.trainer.tracking.registry import RegisterConfig, register
from gmeta.trainer.tracking.run_info import mlflow_dataset, run_tags


class Log:
    """Progress lines on stderr, from rank 0 only."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[gmeta] {message}", file=sys.stderr, flush=True)


@dataclass
class RunContext:
    """Everything a run's stages share (built once by ``train``)."""

    cfg: TrainConfig
    comm: object
    log: Callable
    schema: Schema
    splits: list
    learner: object
    plain: Optional[object]
    reader: TrainInput
    checkpoints: RunCheckpoints
    tracker: Tracker
    signals: StopSignals
    on_epoch: Optional[Callable] = None
    elastic: Optional[object] = None  # gmeta.trainer.run.elastic.Elastic in an elastic job

    @property
    def is_chief(self) -> bool:
        return self.comm.rank == 0


def train(cfg: TrainConfig, on_epoch=None) -> dict:
    """Meta-train, run the model's extra phases, evaluate against the baselines, export, log.

    ``on_epoch(epoch, report)`` is called on every rank after each epoch with the validation
    split's report (``gmeta.trainer.evaluation.splits``; None without a validation split); it may
    raise to stop the run (e.g. a pruned tuning trial). Under an elastic horovodrun the run is
    built again after every reset, from the last commit (``gmeta.trainer.run.elastic``).
    """
    one_gpu = resolve_mode(cfg.parallel) == "sok"
    if elastic_launch():
        return run_elastic(cfg, lambda comm, elastic: _train_on(cfg, on_epoch, comm, elastic), one_gpu)
    return _train_on(cfg, on_epoch, init_communicator(cfg.comm, one_gpu_per_process=one_gpu))


def _train_on(cfg: TrainConfig, on_epoch, comm, elastic=None) -> dict:
    tf.random.set_seed(cfg.seed)
    log = Log(comm.rank == 0)
    if elastic is not None:
        cfg = elastic.agree(cfg, comm)  # after a reset: resume from the last commit
    check_visible("--data", cfg.data, comm.rank)
    check_writable(cfg, comm.rank)
    schema = Schema.load(cfg.data)
    splits = evaluation_splits(schema, cfg.eval_splits)
    cfg = resolve_sizes(cfg, log)
    tiering = plan_run_tiering(cfg, schema, comm, log)
    learner = build_learner(cfg, schema, comm, cfg.meta, tiering)
    plain = build_learner(cfg, schema, comm.with_own_counters(), "none", tiering) \
        if cfg.meta == "maml" and cfg.plain_baseline == "alongside" else None
    reader = TrainInput(cfg, comm)
    steps = reader.steps_per_epoch
    if cfg.epochs == AUTO:
        cfg = dataclasses.replace(cfg, epochs=auto_epochs(steps))
        log(f"--epochs auto = {cfg.epochs} ({steps} steps per epoch; at least {AUTO_MIN_STEPS} steps and "
            f"{AUTO_MIN_EPOCHS} epochs)")
    plan = learner.embedding.plan
    placed = (f" ({len(plan.replicated)} of {len(plan.tables)} tables held whole, --replicate-tables "
              f"{cfg.replicate_tables})" if plan.replicated else "")
    log(f"model {cfg.model} ({cfg.meta}), {comm.size} worker(s), parallel={cfg.parallel}{placed}, "
        f"{steps} steps/epoch x {cfg.epochs} epochs, T={cfg.tasks_per_batch} S={cfg.support_size} "
        f"Q={cfg.query_size}" + ("; the plain network trains alongside" if plain else ""))

    checkpoints = RunCheckpoints.open(cfg, comm, log, schema)  # --resume: found and checked here
    is_chief = comm.rank == 0
    tracker = Tracker(cfg.tracking_uri, cfg.experiment, cfg.run_name or None, enabled=is_chief,
                      run_id=checkpoints.mlflow_run_id, fallback_dir=cfg.output_dir,
                      tags=run_tags(comm.size, cfg.model, cfg.meta) if is_chief and cfg.tracking_uri else None)
    # every rank knows the run, so any survivor can end it when the chief cannot (killed, blocked)
    run_uri, run_id = comm.allgather_object((tracker.uri, tracker.run_id))[0] if cfg.tracking_uri else (None, None)

    def on_deadline(_signum):
        if is_chief:
            tracker.mark("KILLED")
        else:
            mark_if_running(run_uri, run_id, "KILLED")

    signals = StopSignals(comm.stop, grace_s=cfg.stop_grace_secs, rank_label=f"rank {comm.rank}",
                          on_deadline=on_deadline)
    ctx = RunContext(cfg, comm, log, schema, splits, learner, plain, reader, checkpoints, tracker, signals, on_epoch,
                     elastic)
    with signals:  # (still installed while a failure is recorded: a SIGTERM then changes nothing)
        try:
            results = _run(ctx)
        except Stopped as exc:
            signals.stopping = True
            tracker.finish("KILLED")
            if tracker.run_id:
                exc.args = (f"{exc}; MLflow run {tracker.run_id} marked KILLED",)
            raise
        except BaseException as exc:
            signals.stopping = True
            tracker.finish("FAILED")
            if not is_chief and collective_aborted(exc):
                mark_if_running(run_uri, run_id, "FAILED")
            raise
    comm.barrier()
    return results


def _run(ctx: RunContext) -> dict:
    """The run once its MLflow record and signal handling are in place."""
    cfg, tracker = ctx.cfg, ctx.tracker
    if not ctx.checkpoints.mlflow_run_id:
        tracker.log_params({**config_dict(cfg), "workers": ctx.comm.size, "steps_per_epoch": ctx.reader.steps_per_epoch})
        if ctx.is_chief and tracker.enabled:
            tracker.log_input(mlflow_dataset(cfg.data, ctx.schema), context="training")
    ctx.checkpoints.start(tracker.run_id, ctx.learner, ctx.plain, ctx.reader)
    if ctx.elastic is not None:
        ctx.elastic.started(cfg, ctx.checkpoints, ctx.reader, ctx.plain)
    history, validation = _train(ctx)
    if ctx.plain is None and cfg.plain_baseline not in ("alongside", "off"):
        ctx.plain = load_plain_baseline(cfg.plain_baseline, cfg.tracking_uri)
    results, per_task, rows, curve = _evaluate(ctx)
    _write(ctx, results, per_task, rows, curve, history, validation)
    ctx.checkpoints.finish()
    tracker.finish()
    return results


def _train(ctx: RunContext) -> tuple:
    """Epochs with the validation split evaluated after each (early stopping keeps the best),
    then the model's extra phases. Returns ``(history, validation curve)``."""
    cfg, log, tracker = ctx.cfg, ctx.log, ctx.tracker
    val_split = validation_split(cfg, ctx.schema)
    validation = []
    stopper = EarlyStopping(ctx.learner, ctx.plain, cfg.early_stopping, log) if val_split and cfg.early_stopping \
        else None
    if stopper is not None and ctx.checkpoints.resume_point is not None:
        log("WARNING: --early-stopping restarts at the resumed epoch: the best weights of the epochs before "
            "the interruption are not in checkpoints (pass --early-stopping 0 to keep the last epoch instead)")

    def after_epoch(epoch: int) -> bool:
        report, stop = None, False
        if val_split:
            report, _ = evaluate_splits(ctx.learner, cfg.data, [val_split], ctx.comm, cfg.reader_kwargs(),
                                        cfg.eval_steps, lambda m: None, plain=ctx.plain, n_boot=0)
            report = report[val_split]
            tracker.log_metrics({f"val_{k}": report[k] for k in ("gauc_adapted", "gauc_unadapted",
                                                                "auc_adapted")}, step=epoch)
            validation.append({"epoch": epoch, "split": val_split,
                               **{k: report[k] for k in ("gauc_adapted", "gauc_unadapted")}})
            log(f"epoch {epoch} validation ({val_split}): GAUC adapted {report['gauc_adapted']}, "
                f"unadapted {report['gauc_unadapted']}")
            stop = stopper.offer(epoch, report) if stopper is not None else False
        if ctx.on_epoch is not None:
            ctx.on_epoch(epoch, report)
        return stop

    history = fit(ctx.learner, ctx.reader, cfg, ctx.comm, log, tracker, plain=ctx.plain, after_epoch=after_epoch,
                  checkpoints=ctx.checkpoints, signals=ctx.signals)
    if stopper is not None:
        history["best_epoch"] = stopper.restore()
        tracker.log_metrics({f"best_epoch_{k.split()[0]}": v for k, v in history["best_epoch"].items()})
    history.update(run_phases(ctx.learner, ctx.reader, epochs=cfg.generator_epochs, first_epoch=cfg.epochs,
                              learning_rate=cfg.outer_lr, log=log, tracker=tracker,
                              distinct_values=lambda column: distinct_values(cfg.data, "train", column)))
    return history, validation


def _evaluate(ctx: RunContext) -> tuple:
    """Every evaluation split against the baselines, and the support curve: ``(results,
    per-task arrays, gathered rows, curve)``."""
    cfg = ctx.cfg
    rows = {}
    results, per_task = evaluate_splits(ctx.learner, cfg.data, ctx.splits, ctx.comm, cfg.reader_kwargs(),
                                        cfg.eval_steps, ctx.log, plain=ctx.plain,
                                        baselines=item_baselines(cfg.data, ctx.learner.model), rows_out=rows)
    curve = {}
    if cfg.support_points and ctx.splits:
        curve = support_curve(ctx.learner, ctx.plain, cfg.data, ctx.splits, ctx.comm, cfg.reader_kwargs(),
                              cfg.eval_steps, cfg.support_points, ctx.log)
        for split, c in curve.items():
            results[split]["support_curve"] = c
    return results, per_task, rows, curve


#: the full report in the run directory and among the MLflow run's artifacts (gmeta compare reads it)
REPORT_FILE = "eval_results.json"


def _write(ctx: RunContext, results, per_task, rows, curve, history, validation) -> None:
    """MLflow metrics and artifacts, the export (collective), the report on stderr and in
    ``REPORT_FILE``, and on stdout one short JSON line: the headline and where the rest is."""
    cfg, tracker = ctx.cfg, ctx.tracker
    lines = headline(results)
    tracker.log_metrics(headline_metrics(lines))  # the rest of the report is the artifact
    for name, value, k in curve_metrics(results, cfg.support_size):
        tracker.log_metrics({name: value}, step=k)
    comm_stats = history.pop("comm_per_step")
    tracker.log_metrics({"comm_per_step": comm_stats})
    run_dir = ctx.checkpoints.run_dir
    export_dir = export_model(ctx.learner, config_dict(cfg), os.path.join(run_dir, "model"), ctx.is_chief)
    if not ctx.is_chief:
        return
    if cfg.saved_model:
        export_serving(export_dir)  # <export>/saved_model: serving, loads with TensorFlow alone
    report = os.path.abspath(os.path.join(run_dir, REPORT_FILE))
    with open(report, "w") as f:
        json.dump(results, f, sort_keys=True)
    tracker.log_dict(results, REPORT_FILE)
    logged = bool(tracker.run_id) and not tracker.failure
    tracker.log_artifacts(save_per_task(per_task, os.path.join(run_dir, "per_task")), "per_task")
    tracker.log_artifacts(_plots(history, validation, curve, rows, ctx.learner.model,
                                 os.path.join(run_dir, "plots"), ctx.log), "plots")
    model_uri = tracker.log_model(export_dir)
    if cfg.register_as:
        _register(cfg, tracker, ctx.log)
    print_report(results, sys.stderr)
    _print_run_facts(comm_stats, history, tracker, model_uri, export_dir)
    summary = {"run_id": tracker.run_id, "report": report,
               "report_artifact": f"runs:/{tracker.run_id}/{REPORT_FILE}" if logged else None,
               "export": os.path.abspath(export_dir), "model_uri": model_uri, "splits": list(lines), **lines}
    if cfg.results_json:
        with open(cfg.results_json, "w") as f:
            json.dump(summary, f)
    print(json.dumps(summary), flush=True)


def _plots(history, validation, curve, rows, model, directory: str, log) -> str:
    """The run's PNG plots (gmeta.trainer.evaluation.plots); a plot that fails is reported, not fatal."""
    heads = [h for r in rows.values() if r for h in heads_of(r)]
    jobs = [("learning_curve.png", lambda p: plots.learning_curve(history, validation, p))]
    if curve:
        jobs.append(("support_curve.png", lambda p: plots.support_curve(curve, p)))
    if heads:
        jobs.append(("calibration.png", lambda p: plots.calibration(rows, heads[0], p,
                                                                     probabilities=model.target != "rating")))
    os.makedirs(directory, exist_ok=True)
    for name, draw in jobs:
        try:
            draw(os.path.join(directory, name))
        except Exception as exc:  # noqa: BLE001 - a plot is never worth a failed run
            log(f"WARNING: plot {name} failed ({type(exc).__name__}: {exc})")
    return directory


def _register(cfg, tracker, log) -> None:
    """gmeta register's logic on this run (its message goes to stderr)."""
    if tracker.failure or not tracker.run_id:
        log(f"WARNING: --register-as {cfg.register_as} skipped: the run's MLflow logging failed "
            f"({tracker.failure or 'no run'}); register later with gmeta register")
        return
    name, _, alias = cfg.register_as.partition("@")
    with contextlib.redirect_stdout(sys.stderr):
        register(RegisterConfig(run=tracker.run_id, name=name, alias=alias, tracking_uri=tracker.uri))


def check_writable(cfg: TrainConfig, rank: int) -> None:
    """Every place the run writes, tried before any work (not found unwritable after an epoch)."""
    places = [("--output-dir", cfg.output_dir)]
    if cfg.checkpoint_dir and cfg.checkpoint_dir.lower() != "none" and not cfg.resume:
        places.append(("--checkpoint-dir", cfg.checkpoint_dir))
    if cfg.results_json and rank == 0:
        places.append(("--results-json", os.path.dirname(os.path.abspath(cfg.results_json))))
    for flag, directory in places:
        probe = fs.join(directory, f".gmeta-write-test-{os.getpid()}-{rank}")
        try:
            fs.write_text(probe, "")
            fs.delete_file(probe)
        except OSError as exc:
            raise ValueError(f"{flag} {directory}: not writable ({type(exc).__name__}: {exc})") from None


def _print_run_facts(comm_stats, history, tracker, model_uri, export_dir) -> None:
    out = sys.stderr
    per_step = ", ".join(f"{k} {v['bytes'] / 1e6:.3f} MB/{v['calls']:.0f} calls"
                         for k, v in comm_stats.items() if v["calls"])
    print(f"communication per step: {per_step or 'none'}", file=out)
    wait = history["input_wait"]
    starts = wait["epoch_starts"]
    print(f"input wait: {100 * history['input_wait_fraction']:.1f}% of step time "
          f"({100 * starts['share_of_step_time']:.1f}% at {starts['steps']} epoch starts; the other steps waited "
          f"{wait['mean_ms_other_steps']:.2f} ms on average); by wait: "
          + json.dumps({k: [v["steps"], round(v["share_of_step_time"], 5)] for k, v in wait["histogram"].items()}),
          file=out)
    if tracker.run_id:
        print(f"mlflow run: {tracker.run_id} in {tracker.uri}  model: {model_uri}", file=out)
    if tracker.failure:
        print(f"MLflow logging stopped during the run ({tracker.failure}); what it missed is in the run "
              f"directory", file=out)
    print(f"export: {export_dir}", file=out, flush=True)
