"""``gmeta evaluate``: evaluate a logged run or a registered model on a dataset (one process).

    gmeta evaluate --run RUN_ID --data DIR
    gmeta evaluate --model models:/melu@champion --data DIR
    gmeta evaluate --export runs/<id>/model --data DIR
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from gmeta.trainer.launch import run_guarded


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


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default="", help="MLflow run id of a gmeta train run")
    src.add_argument("--model", dest="model_uri", default="", help="MLflow model URI, e.g. models:/melu@champion")
    src.add_argument("--export", default="", help="a local gmeta export directory")
    p.add_argument("--data", required=True, help="dataset directory with schema.json")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--eval-splits", default="", help="comma separated; default: every split but train")
    p.add_argument("--inner-steps", type=int, default=-1, help="-1: the value the model was trained with")
    p.add_argument("--tasks-per-batch", type=int, default=32)


def main(args) -> int:
    cfg = EvaluateConfig(data=args.data, run=args.run, model_uri=args.model_uri, export=args.export,
                         tracking_uri=args.tracking_uri,
                         eval_splits=tuple(s for s in args.eval_splits.split(",") if s),
                         inner_steps=args.inner_steps, tasks_per_batch=args.tasks_per_batch)
    return run_guarded(lambda: evaluate(cfg) and 0)


def evaluate(cfg: EvaluateConfig) -> dict:
    from gmeta.trainer.evaluation import evaluate_splits, evaluation_splits
    from gmeta.trainer.export import load_model
    from gmeta.trainer.tracking import model_dir_from_uri, model_uri_of_run

    if cfg.export:
        export_dir = cfg.export
    else:
        uri = cfg.model_uri or model_uri_of_run(cfg.run, cfg.tracking_uri)
        export_dir = model_dir_from_uri(uri, cfg.tracking_uri)
    learner, meta = load_model(export_dir)
    run = meta.get("run_config", {})
    steps = cfg.inner_steps if cfg.inner_steps >= 0 else (
        run.get("inner_steps", 1) if run.get("eval_inner_steps", -1) < 0 else run["eval_inner_steps"])
    reader_kwargs = {"tasks_per_batch": cfg.tasks_per_batch,
                     "support_size": run.get("support_size", 40), "query_size": run.get("query_size", 10)}
    splits = evaluation_splits(learner.model.schema, cfg.eval_splits)
    results = evaluate_splits(learner, cfg.data, splits, learner.comm, reader_kwargs, steps,
                              log=lambda m: print(f"[gmeta] {m}", file=sys.stderr, flush=True))
    print(json.dumps(results, sort_keys=True), flush=True)
    return results
