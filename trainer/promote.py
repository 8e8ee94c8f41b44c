"""``gmeta promote``: champion and challenger. A finished run's model (the challenger) and the
model behind ``models:/NAME@ALIAS`` (the champion) are scored on the same held-out tasks; the
challenger becomes a new version of NAME, and takes the alias only when it wins.

    gmeta promote --run RUN_ID --name melu [--alias champion] [--metric user_cold/gauc_adapted]
                  [--min-gain 0.002] [--data DIR]

The rule (``gmeta.trainer.evaluation.promotion.decide``): the challenger's gain over the champion
(paired over the tasks, sign flipped for logloss/MAE/RMSE) is at least ``--min-gain`` AND its
paired 95% bootstrap interval's lower bound is above 0. Without a champion the challenger takes
the alias. The new version carries the decision, both models' headline metrics and the paired
difference (tags ``gmeta.promote.*`` and its description); stdout gets a short table and one
JSON line.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass

from gmeta.io.schema import Schema, SchemaError
from gmeta.trainer.evaluate import EvaluateConfig, score, trained_caps
from gmeta.trainer.evaluation.metrics import AGGREGATES
from gmeta.trainer.evaluation.promotion import RULE, decide, no_champion, paired_gain, parse_metric
from gmeta.trainer.evaluation.report import headline
from gmeta.trainer.parallel.launch import one_line, run_guarded
from gmeta.trainer.serving.export import load_model
from gmeta.trainer.tracking.mlflow_run import DEFAULT_TRACKING_URI, add_tracking_arguments, model_dir_from_uri
from gmeta.trainer.tracking.registry import (RegisterConfig, finished_run, record_on_version, register,
                                             set_alias, version_behind_alias)
from gmeta.trainer.tracking.run_info import training_data

TAG = "gmeta.promote."   # the model version's tags: TAG + decision, reason, metric, gain, lo, hi, ...


@dataclass(frozen=True)
class PromoteConfig:
    run: str
    name: str
    alias: str = "champion"
    metric: str = "user_cold/gauc_adapted"
    min_gain: float = 0.002
    data: str = ""
    tracking_uri: str = DEFAULT_TRACKING_URI


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="MLflow run id of a finished gmeta train run: the challenger")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default=PromoteConfig.alias, help="the alias that marks the champion")
    p.add_argument("--metric", default=PromoteConfig.metric,
                   help="SPLIT/METRIC_SCORER both models are judged on (METRIC: gauc, ndcg10, ndcg5, mrr, "
                        "logloss, ...; SCORER: adapted or unadapted)")
    p.add_argument("--min-gain", type=float, default=PromoteConfig.min_gain,
                   help="smallest gain (challenger - champion) that promotes; its 95%% interval must also be above 0")
    p.add_argument("--data", default=PromoteConfig.data,
                   help="dataset to score both on; default: the one the challenger run was trained on")
    add_tracking_arguments(p)


def main(args) -> int:
    cfg = PromoteConfig(run=args.run, name=args.name, alias=args.alias, metric=args.metric,
                        min_gain=args.min_gain, data=args.data, tracking_uri=args.tracking_uri)
    return run_guarded(lambda: promote(cfg) and 0)


def promote(cfg: PromoteConfig) -> dict:
    choice = parse_metric(cfg.metric)
    run, challenger_uri = finished_run(cfg.run, cfg.tracking_uri)
    data = _dataset(cfg, run, choice.split)
    where = f"models:/{cfg.name}@{cfg.alias}"
    champion = version_behind_alias(cfg.name, cfg.alias, cfg.tracking_uri)
    models = {"challenger": (f"run {cfg.run}", challenger_uri)}
    if champion is not None:  # pinned: the alias may move while we score
        models["champion"] = (f"models:/{cfg.name}/{champion.version}",) * 2
    scored, caps = _score(models, data, choice, cfg.tracking_uri)

    paired = None
    if champion is None:
        decision = no_champion(where)
    else:
        _check_same_tasks(scored, models, data, choice)
        paired = paired_gain(scored["challenger"][1], scored["champion"][1], choice.metric)
        decision = decide(paired["gain"], paired["lo"], cfg.min_gain)

    with contextlib.redirect_stdout(sys.stderr):  # stdout: the table and the JSON line only
        version = int(register(RegisterConfig(run=cfg.run, name=cfg.name, tracking_uri=cfg.tracking_uri))["version"])
    record = _finite({
        "decision": "promoted" if decision.promote else "kept", "reason": decision.reason, "rule": RULE,
        "name": cfg.name, "alias": cfg.alias, "run_id": cfg.run, "challenger_version": version,
        "champion_version": int(champion.version) if champion is not None else None,
        "champion_run_id": champion.run_id if champion is not None else None,
        "metric": str(choice), "min_gain": cfg.min_gain, "data": data,
        "caps": {"support": caps[0], "query": caps[1]}, "paired": paired,
        **{who: headline(scored[who][0])[choice.split] if who in scored else None
           for who in ("challenger", "champion")},
    })
    table = _table(record, where)
    # the record first: the alias never points at a version without its decision
    record_on_version(cfg.name, version, _tags(record), table, cfg.tracking_uri)
    if decision.promote:
        set_alias(cfg.name, cfg.alias, version, cfg.tracking_uri)
    print(table, flush=True)
    summary = _summary(record)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return summary


def _score(models: dict, data: str, choice, tracking_uri: str) -> tuple:
    """``({who: (report, per-task metrics of the chosen scorer)}, caps)``: each model scored as
    ``gmeta evaluate`` scores it, on the same rows: the larger of their trained caps, so neither
    loses rows it was built for."""
    dirs = {who: model_dir_from_uri(uri, tracking_uri) for who, (_, uri) in models.items()}
    loaded = {who: load_model(d) for who, d in dirs.items()}
    caps = tuple(max(c) for c in zip(*(trained_caps(meta) for _, meta in loaded.values())))
    scored = {}
    for who, (learner, meta) in loaded.items():
        label = models[who][0]
        print(f"[gmeta] scoring the {who} ({label}) on {data} split {choice.split}", file=sys.stderr, flush=True)
        try:
            results, per_task = score(learner, meta, data, (choice.split,), EvaluateConfig.tasks_per_batch,
                                      inner_steps=-1, caps=caps, export_dir=dirs[who])
        except Exception as exc:  # noqa: BLE001 - say which model could not be scored, keep the cause
            raise ValueError(f"the {who} ({label}) could not be scored on {data} split {choice.split}: "
                             f"{one_line(exc)}; is it a model of this dataset's schema? (--data)") from exc
        scored[who] = (results, _per_task(results, per_task, choice, f"the {who} ({label})"))
    return scored, caps


def _dataset(cfg: PromoteConfig, run, split: str) -> str:
    """``--data``, else the dataset the challenger was trained on; it must hold the split."""
    data = cfg.data or training_data(run)
    if not data:
        raise ValueError(f"--run {cfg.run}: the run logged no dataset; pass --data DIR")
    told = f"--data {data}" if cfg.data else f"the dataset run {cfg.run} was trained on ({data})"
    try:
        schema = Schema.load(data)
    except (SchemaError, OSError) as exc:
        raise ValueError(f"{told} cannot be read here ({exc}); pass a gmeta dataset with --data DIR") from None
    if split not in schema.splits:
        raise ValueError(f"--metric {cfg.metric}: {told} has no split {split!r} (its splits: "
                         f"{list(schema.splits)}); name one of them, or pass --data DIR")
    return data


def _per_task(results: dict, per_task: dict, choice, model: str) -> dict:
    """The per-task metrics of the chosen scorer, from the model's first head (its headline)."""
    head = next(k for k, v in results[choice.split].items() if isinstance(v, dict) and "adapted" in v)
    pt = per_task[choice.split][f"{head}/{choice.scorer}"]
    column = AGGREGATES[choice.metric][0]
    if column not in pt:
        raise ValueError(f"--metric {choice}: {model} has no per-task {column!r} on split {choice.split} "
                         f"(it has {sorted(k for k in pt if k not in ('task_ids', 'rows', 'positives'))})")
    return pt


def _check_same_tasks(scored: dict, models: dict, data: str, choice) -> None:
    """Paired means the same tasks and rows: both models read one split with the same caps."""
    a, b = (scored[who][1] for who in ("challenger", "champion"))
    if a["task_ids"].shape != b["task_ids"].shape or (a["task_ids"] != b["task_ids"]).any() \
            or (a["rows"] != b["rows"]).any():
        raise ValueError(f"split {choice.split} of {data}: the challenger ({models['challenger'][0]}) and the "
                         f"champion ({models['champion'][0]}) scored different tasks or rows "
                         f"({a['task_ids'].size} and {b['task_ids'].size} tasks); they cannot be paired")


def _finite(obj):
    """NaN and infinities become None (valid JSON, and no 'nan' tags)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _tags(record: dict) -> dict:
    paired = record["paired"] or {}
    tags = {k: record[k] for k in ("decision", "reason", "metric", "min_gain", "data")}
    tags.update({k: paired.get(k) for k in ("gain", "lo", "hi", "tasks")})
    tags["champion_version"] = record["champion_version"]
    tags = {TAG + k: "none" if v is None else v for k, v in tags.items()}
    tags[TAG + "record"] = json.dumps(record, sort_keys=True)
    return tags


def _summary(record: dict) -> dict:
    """The stdout JSON line: the decision, the versions, the paired gain."""
    paired = record["paired"] or {}
    out = {k: record[k] for k in ("decision", "reason", "name", "alias", "run_id", "challenger_version",
                                  "champion_version", "metric", "min_gain", "data")}
    out["alias_version"] = record["challenger_version"] if record["decision"] == "promoted" \
        else record["champion_version"]
    out.update({k: paired.get(k) for k in ("gain", "lo", "hi", "tasks")})
    out.update({f"{who}_value": paired.get(who) for who in ("challenger", "champion")})
    if not paired:   # no champion: the challenger was still scored; its value as its headline names it
        out["challenger_value"] = (record["challenger"] or {}).get(record["metric"].partition("/")[2])
    return out


def _table(record: dict, where: str) -> str:
    """The human summary: both models' headline metrics, the paired gain, the decision."""
    champ, chall = record["champion"] or {}, record["challenger"]
    versus = f"version {record['champion_version']}" if record["champion"] else "no champion yet"
    lines = [f"{record['name']} version {record['challenger_version']} (run {record['run_id']}) against {where} "
             f"({versus}) on {record['data']}, metric {record['metric']}",
             f"  {'':<24}{'challenger':>12}{'champion':>12}"]
    for key, value in chall.items():
        if "_minus_" in key or key.endswith(("_lo", "_hi")):
            continue
        other = champ.get(key)
        cells = [f"{v:>12.4f}" if isinstance(v, float) else f"{'-' if v is None else v:>12}" for v in (value, other)]
        lines.append(f"  {key:<24}{''.join(cells)}")
    paired = record["paired"]
    if paired:
        lines.append(f"  gain (challenger - champion, paired over {paired['tasks']} tasks): {_signed(paired['gain'])} "
                     f"[{_signed(paired['lo'])}, {_signed(paired['hi'])}]")
    lines.append(f"  rule: {RULE}")
    moved = (f"{where} -> version {record['challenger_version']}" if record["decision"] == "promoted"
             else f"{where} stays at version {record['champion_version']}")
    lines.append(f"  decision: {record['decision'].upper()}: {record['reason']}; {moved}")
    return "\n".join(lines)


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.4f}"
