"""``gmeta evaluate``: evaluate a logged run or a registered model on a dataset (one process).

    gmeta evaluate --run RUN_ID --data DIR
    gmeta evaluate --model models:/melu@champion --data DIR
    gmeta evaluate --export runs/<id>/model --data DIR
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from gmeta.io.schema import Schema
from gmeta.io.vocab import OOV_ROW, keeps_rows, load_vocabularies
from gmeta.trainer.evaluation.report import print_report
from gmeta.trainer.evaluation.splits import evaluate_splits, evaluation_splits, item_baselines
from gmeta.trainer.parallel.launch import run_guarded
from gmeta.trainer.predict import write_eval_predictions
from gmeta.trainer.run.build import load_plain_baseline
from gmeta.trainer.serving.export import load_export_vocabularies, load_model
from gmeta.trainer.tracking.mlflow_run import add_tracking_arguments, resolve_export_dir


@dataclass(frozen=True)
class EvaluateConfig:
    data: str
    run: str = ""
    model_uri: str = ""
    export: str = ""
    tracking_uri: str = "sqlite:///mlflow.db"
    eval_splits: tuple = ()
    inner_steps: int = -1
    tasks_per_batch: int = 32
    plain_baseline: str = ""
    predictions_out: str = ""


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default="", help="MLflow run id of a gmeta train run")
    src.add_argument("--model", dest="model_uri", default="", help="MLflow model URI, e.g. models:/melu@champion")
    src.add_argument("--export", default="", help="a local gmeta export directory")
    p.add_argument("--data", required=True, help="dataset directory with schema.json")
    add_tracking_arguments(p)
    p.add_argument("--eval-splits", default="", help="comma separated; default: every split but train")
    p.add_argument("--inner-steps", type=int, default=-1, help="-1: the value the model was trained with")
    p.add_argument("--tasks-per-batch", type=int, default=32)
    p.add_argument("--plain-baseline", default="", metavar="MODEL",
                   help="a --meta none model (export directory, models:/ URI or run id) to report "
                        "unadapted and fine-tuned next to this one")
    p.add_argument("--predictions-out", default="", metavar="FILE",
                   help="also write one row per query row (split, task, item, label, adapted and unadapted "
                        "score) to FILE (.parquet, .csv or .orc)")


def main(args) -> int:
    cfg = EvaluateConfig(data=args.data, run=args.run, model_uri=args.model_uri, export=args.export,
                         tracking_uri=args.tracking_uri,
                         eval_splits=tuple(s for s in args.eval_splits.split(",") if s),
                         inner_steps=args.inner_steps, tasks_per_batch=args.tasks_per_batch,
                         plain_baseline=args.plain_baseline, predictions_out=args.predictions_out)
    return run_guarded(lambda: evaluate(cfg) and 0)


def evaluate(cfg: EvaluateConfig) -> dict:
    source = cfg.export or cfg.model_uri or cfg.run
    export_dir = resolve_export_dir(source, cfg.tracking_uri)
    learner, meta = load_model(export_dir)
    plain = load_plain_baseline(cfg.plain_baseline, cfg.tracking_uri) if cfg.plain_baseline else None
    rows = {}
    results, _ = score(learner, meta, cfg.data, cfg.eval_splits, cfg.tasks_per_batch, cfg.inner_steps,
                       plain=plain, rows_out=rows, export_dir=export_dir)
    if cfg.predictions_out:
        write_eval_predictions(rows, cfg.predictions_out, log=_log)
    print_report(results, sys.stderr)
    print(json.dumps(results, sort_keys=True), flush=True)
    return results


def trained_caps(meta: dict) -> tuple:
    """``(support, query)``: the row caps the exported model was trained with."""
    run = meta.get("run_config", {})
    return run.get("support_size", 40), run.get("query_size", 10)


def grown_tables(export_dir: str, meta: dict, schema, data: str) -> dict:
    """``{feature: rows the model has}`` for the features whose vocabulary grew in ``data`` since the
    model was trained (a later day's dataset, converted ``--vocab-from`` the model's): ids past the
    model's rows are values it never saw, scored on the out-of-vocabulary row as serving scores
    them. Without that yesterday's champion could not be scored on today's tasks (``gmeta
    promote``). A vocabulary that does not keep the model's values on their rows is refused."""
    if not export_dir or not meta.get("vocabularies"):
        return {}
    ours, theirs = load_export_vocabularies(export_dir, meta), load_vocabularies(data)
    rows = {t.name: t.num_rows for t in Schema.load(data).tables}
    out = {}
    for feature, vocab in ours.items():
        table = schema.feature(feature).table
        if rows.get(table, 0) <= schema.table(table).num_rows:
            continue
        grown = theirs.get(vocab.table)
        if grown is None or not keeps_rows(vocab, grown):
            raise ValueError(f"{data}: table {table} has {rows[table]:,} rows, the model {vocab.size:,}, and its "
                             f"vocabulary does not keep the model's values on their rows: convert it with "
                             f"--vocab-from the dataset the model was trained on")
        out[feature] = vocab.size
    return out


def score(learner, meta: dict, data: str, splits, tasks_per_batch: int, inner_steps: int, caps=None,
          plain=None, rows_out=None, export_dir: str = "") -> tuple:
    """``(report, per_task)`` of a loaded model (``load_model``) on ``data``'s splits, as ``gmeta
    evaluate`` reports them: its own inner steps unless ``inner_steps >= 0``, its trained row caps
    unless ``caps`` (``gmeta promote`` scores two models on the same rows), the item baselines
    fitted on the training split when the dataset has one. ``export_dir``: the model's export, so a
    dataset whose vocabularies grew since (``grown_tables``) can be scored."""
    run = meta.get("run_config", {})
    steps = inner_steps if inner_steps >= 0 else (
        run.get("inner_steps", 1) if run.get("eval_inner_steps", -1) < 0 else run["eval_inner_steps"])
    support, query = caps or trained_caps(meta)
    reader_kwargs = {"tasks_per_batch": tasks_per_batch, "support_size": support, "query_size": query}
    schema = learner.model.schema
    baselines = item_baselines(data, learner.model) if "train" in schema.splits else {}
    grown = grown_tables(export_dir, meta, schema, data)
    for feature, size in grown.items():
        _log(f"{data}: feature {feature} has ids past the model's {size:,} rows (new since it was trained): "
             f"scored on the out-of-vocabulary row {OOV_ROW}")
    return evaluate_splits(learner, data, evaluation_splits(schema, splits), learner.comm, reader_kwargs, steps,
                           log=_log, plain=plain, baselines=baselines, rows_out=rows_out, unseen_past=grown)


def _log(message: str) -> None:
    print(f"[gmeta] {message}", file=sys.stderr, flush=True)
