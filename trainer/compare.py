"""``gmeta compare``: several runs side by side in per-task metrics, with intervals, and which
differences are significant (paired bootstrap over the tasks both runs scored).

    gmeta compare RUN_A RUN_B ... [--metric gauc] [--splits user_cold] [--scorer adapted]

A run is an MLflow run id (its ``eval_results.json`` and ``per_task/`` artifacts) or a local run
directory written by ``gmeta train`` (``<output-dir>/<run>/``). The first run is the reference:
every other run's difference from it is tested.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from gmeta.trainer.evaluation.metrics import AGGREGATES, paired_difference
from gmeta.trainer.evaluation.report import load_per_task
from gmeta.trainer.parallel.launch import run_guarded
from gmeta.trainer.tracking.mlflow_run import add_tracking_arguments

BASELINES = ("item_mean", "item_knn")   # shown next to every run: what it must beat


@dataclass(frozen=True)
class CompareConfig:
    runs: tuple
    metric: str = "gauc"
    splits: tuple = ()
    scorer: str = "adapted"
    tracking_uri: str = "sqlite:///mlflow.db"
    n_boot: int = 1000


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="MLflow run ids or local run directories")
    p.add_argument("--metric", default="gauc", choices=sorted(AGGREGATES), help="metric to compare")
    p.add_argument("--splits", default="", help="comma separated; default: every split all runs evaluated")
    p.add_argument("--scorer", default="adapted",
                   help="which scores of each run: adapted, unadapted, plain, plain_finetuned, item_mean, ...")
    add_tracking_arguments(p)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")


def main(args) -> int:
    cfg = CompareConfig(runs=tuple(args.runs), metric=args.metric,
                        splits=tuple(s for s in args.splits.split(",") if s), scorer=args.scorer,
                        tracking_uri=args.tracking_uri, n_boot=args.n_boot)
    return run_guarded(lambda: compare(cfg) is not None and 0)


def _run_dir(run: str, tracking_uri: str) -> str:
    """A local directory holding ``eval_results.json`` and ``per_task/`` for ``run``."""
    if os.path.isdir(run):
        if not os.path.exists(os.path.join(run, "eval_results.json")):
            raise FileNotFoundError(f"{run}: no eval_results.json (is it a gmeta train run directory?)")
        return run
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        results = mlflow.artifacts.download_artifacts(run_id=run, artifact_path="eval_results.json")
        mlflow.artifacts.download_artifacts(run_id=run, artifact_path="per_task",
                                            dst_path=os.path.dirname(results))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for unknown runs
        raise ValueError(f"{run}: not a local run directory, and no such run with eval_results.json and "
                         f"per_task/ in {tracking_uri} ({type(exc).__name__}: {exc})") from None
    return os.path.dirname(results)


def compare(cfg: CompareConfig) -> dict:
    dirs = [_run_dir(r, cfg.tracking_uri) for r in cfg.runs]
    results = [json.load(open(os.path.join(d, "eval_results.json"))) for d in dirs]
    common = [s for s in results[0] if all(s in r for r in results[1:])]
    splits = list(cfg.splits) or common
    missing = [s for s in splits if s not in common]
    if missing:
        raise ValueError(f"--splits {missing}: not evaluated by every run (common: {common})")
    out = {}
    for split in splits:
        per_task = [load_per_task(os.path.join(d, "per_task", f"{split}.npz")) for d in dirs]
        head = next(k for k in results[0][split] if isinstance(results[0][split][k], dict)
                    and "adapted" in results[0][split][k])
        key = f"{head}/{cfg.scorer}"
        for run, pt in zip(cfg.runs, per_task):
            if key not in pt:
                raise ValueError(f"run {run}: no per-task scores {key!r} in split {split} "
                                 f"(has {sorted(pt)})")
        rows = []
        for run, res in zip(cfg.runs, results):
            m = res[split][head][cfg.scorer][cfg.metric]
            # each run's own adapted-minus-baseline differences (paired over its tasks, from its report)
            diffs = res[split][head].get("differences", {})
            baselines = {b: diffs[b][cfg.metric] for b in BASELINES if cfg.metric in diffs.get(b, {})}
            rows.append({"run": run, "value": m["value"], "lo": m["lo"], "hi": m["hi"],
                         "adapted_minus_baselines": baselines})
        diffs = [dict(paired_difference(pt[key], per_task[0][key], cfg.metric, n_boot=cfg.n_boot), run=run)
                 for run, pt in zip(cfg.runs[1:], per_task[1:])]
        out[split] = {"metric": cfg.metric, "scorer": cfg.scorer, "runs": rows, "vs_first": diffs}
        _print_split(split, out[split], sys.stderr)
    print(json.dumps(out, sort_keys=True, default=float), flush=True)
    return out


def _print_split(split: str, table: dict, out) -> None:
    print(f"\n{split}: {table['metric']} of the {table['scorer']} scores (95% intervals over tasks)", file=out)
    for row in table["runs"]:
        versus = "; ".join(f"adapted - {b} {d['diff']:+.4f} [{d['lo']:+.3f},{d['hi']:+.3f}]"
                           for b, d in row.get("adapted_minus_baselines", {}).items()
                           if d.get("diff") is not None and d.get("lo") is not None)
        print(f"  {row['run']:<40} {row['value']:.4f} [{row['lo']:.3f},{row['hi']:.3f}]"
              + (f"   ({versus})" if versus else ""), file=out)
    for d in table["vs_first"]:
        verdict = "significant" if d["significant"] else "NOT significant"
        print(f"  {d['run']} - {table['runs'][0]['run']}: {d['diff']:+.4f} [{d['lo']:+.3f},{d['hi']:+.3f}] "
              f"over {d['tasks']} tasks, {verdict}", file=out)
