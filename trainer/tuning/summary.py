"""What a study found: the best trial, how far it can be trusted (its interval, the baselines, the
runner-up), the command that reruns it, and the table of trials. ``cfg`` is gmeta tune's
TuneConfig (gmeta.trainer.tune)."""

from __future__ import annotations

import glob
import os

from gmeta.trainer.evaluation.metrics import paired_difference
from gmeta.trainer.evaluation.report import load_per_task
from gmeta.trainer.evaluation.rows import headline_of, score_key
from gmeta.trainer.tuning.argv import rerun_command
from gmeta.trainer.tuning.space import apply_values, show_value
from gmeta.trainer.tuning.trials import OBJECTIVE

#: fewer validation tasks than this cannot rank trials that differ by a few thousandths of GAUC
MIN_VALIDATION_TASKS = 200


def best_trial(study):
    """The study's best trial, or None while no trial has completed."""
    try:
        return study.best_trial
    except ValueError:
        return None


def summarize(cfg, study) -> dict | None:
    from optuna.trial import TrialState

    best = best_trial(study)
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


def trial_facts(cfg, study, best) -> dict:
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


def _paired_trials(cfg, a: int, b: int):
    """GAUC adapted of trial ``a`` minus trial ``b``, paired over the validation tasks, from the
    per-task arrays their runs saved (None when either is not on this machine)."""
    per_task = []
    for number in (a, b):
        found = sorted(glob.glob(os.path.join(cfg.study_dir, f"trial-{number}", "*", "per_task", f"{cfg.validation}.npz")))
        if not found:
            return None
        pt = load_per_task(found[-1])
        head = headline_of(pt)
        if head is None:
            return None
        per_task.append(pt[score_key(head, "adapted")])
    d = paired_difference(per_task[0], per_task[1], "gauc")
    return {k: d[k] for k in ("diff", "lo", "hi", "significant", "tasks")}


def print_trials(study, out) -> None:
    rows = [("trial", "state", "value", "seconds", "params")]
    for t in study.trials:
        params = t.user_attrs.get("params") or t.params
        secs = t.duration.total_seconds() if t.duration else None
        rows.append((str(t.number), t.state.name, "" if t.value is None else f"{t.value:.5f}",
                     "" if secs is None else f"{secs:.1f}",
                     " ".join(f"{k}={show_value(tuple(v) if isinstance(v, list) else v)}" for k, v in params.items())))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"trials of study {study.study_name!r}:", file=out)
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4], file=out)
    out.flush()
