"""One trial: its config, its run (``train`` in this process, which may prune it, or ``gmeta train``
under horovodrun) and its value, and the objective Optuna calls. ``cfg`` is gmeta tune's
TuneConfig (gmeta.trainer.tune)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys

from gmeta.trainer.parallel.launch import horovodrun_command, horovodrun_env
from gmeta.trainer.run.loop import TrainingDiverged
from gmeta.trainer.run.training import train
from gmeta.trainer.tuning.argv import config_argv
from gmeta.trainer.tuning.space import apply_values, jsonable, show_value, suggest

#: a trial's value, which the study maximises
OBJECTIVE = "validation GAUC adapted (final model, validation split)"


def log(message: str) -> None:
    """gmeta tune's progress lines go to stderr: stdout holds only the summary JSON."""
    print(f"[gmeta tune] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _environ(values: dict):
    """``values`` in os.environ while an in-process trial runs (MLflow reads its run context there)."""
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


class TrialFailed(RuntimeError):
    """A trial that ran but produced no value (its run failed, or the GAUC is undefined)."""


def trial_config(cfg, values: dict, number: int):
    """The full config of trial ``number``: base + sampled values + per-trial settings that keep it
    cheap (only the validation split evaluated, no plain network, no support curve) and separate."""
    tcfg = apply_values(cfg.base, values)
    tcfg = dataclasses.replace(
        tcfg, validation_split=cfg.validation, eval_splits=(cfg.validation,), plain_baseline="off", saved_model=False,
        support_curve="none",
        output_dir=os.path.join(cfg.study_dir, f"trial-{number}"), run_name=f"{cfg.study_name}-trial-{number}",
        comm="local" if cfg.in_process else tcfg.comm)
    return tcfg.validate()


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
    cmd = horovodrun_command(workers, [sys.executable, "-m", "gmeta.cli", "train", *config_argv(tcfg)])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=horovodrun_env(base=dict(os.environ, **env)))  # stderr: ours, live
    if proc.returncode != 0:
        raise TrialFailed(f"horovodrun exited with {proc.returncode} (its workers' errors are above)")
    with open(last_json(proc.stdout)["report"]) as f:  # the result line names the full report
        return _final_value(json.load(f), split, trial)


def make_objective(cfg, tracking, failures: list):
    import optuna

    def objective(trial) -> float:
        values = suggest(trial, cfg.space)
        trial.set_user_attr("params", jsonable(values))
        tcfg = trial_config(cfg, values, trial.number)
        log(f"trial {trial.number}: " + " ".join(f"{k}={show_value(v)}" for k, v in values.items()))
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
