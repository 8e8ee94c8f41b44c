"""The Optuna study: its pruner, and opening (or resuming) it with the settings it was started
with. ``cfg`` is gmeta tune's TuneConfig (gmeta.trainer.tune)."""

from __future__ import annotations

import os


def make_pruner(cfg):
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


def open_study(cfg, pruner=None):
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


def describe_pruner(cfg) -> str:
    parts = []
    if cfg.pruner == "median":
        parts.append(f"median (after {cfg.prune_startup_trials} completed trials and {cfg.prune_warmup_epochs} "
                     "warm-up epoch(s))")
    if cfg.prune_below is not None:
        parts.append(f"below {cfg.prune_below:g} after {cfg.prune_warmup_epochs} warm-up epoch(s)")
    return " or ".join(parts) or "none"
