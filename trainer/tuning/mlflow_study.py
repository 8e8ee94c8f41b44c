"""The study in MLflow: one parent run per study (reused when it resumes) and every trial's run as
its child. ``cfg`` is gmeta tune's TuneConfig (gmeta.trainer.tune)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

from gmeta.trainer.config import config_dict
from gmeta.trainer.tuning.trials import OBJECTIVE, log


class StudyTracking:
    """The study's parent run (created, or reused when the study resumes) and its children."""

    ROLE, STUDY, TRIAL, STATE = "gmeta.tune.role", "gmeta.tune.study", "gmeta.tune.trial", "gmeta.tune.state"

    def __init__(self, cfg, study):
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
