"""Cold start on real data: each zoo model against popularity, item-kNN and the plain network.

The development set (MovieLens latest-small by default, ``--src``) is converted under both
protocols, ``explicit`` (query = the user's last 10 ratings, relevant = rating >= 4) and
``implicit`` (every rated item a positive, ``--negatives`` sampled label-0 rows per query set and
one per support positive), for both cold-user rules (``time``: the latest users to arrive;
``random``: a seeded draw), support = a user's earlier events, query = the last 10. Each model
trains with ``gmeta train``'s defaults over every seed (the seed also draws the random cold users,
the validation users and the negatives), the plain network (``--meta none``, the same network)
alongside on the same batches: the same budget. Per setting the table pools the seeds' per-task
metrics of the evaluated split and gives GAUC and nDCG@10 for the model adapted and unadapted,
the plain network unadapted and fine-tuned, the item mean and item-kNN, then the adapted model
minus each with a paired bootstrap interval over the pooled tasks. Pooling: the random rule draws
other users per seed, so its tasks are distinct; the time rule has the same cold users in every
seed, so each user's per-task metrics are averaged over the seeds (one task each, not three). The
table goes to stderr; the last stdout line is one JSON object. With ``--out DIR --reuse`` the runs
a previous call finished there are read back instead of trained again.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gmeta.models.registry import MODELS
from gmeta.trainer.evaluation.metrics import paired_difference, summarize
from gmeta.trainer.evaluation.report import load_per_task
from gmeta.trainer.evaluation.rows import headline_of, score_key

SCORERS = ("adapted", "unadapted", "plain", "plain_finetuned", "item_mean", "item_knn")
METRICS = ("gauc", "ndcg@10")
PROTOCOLS = ("explicit", "implicit")
COLD_RULES = ("time", "random")
DEV_SET = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-latest-small"
TASK_KEY = 1 << 40      # pooled task id = seed * TASK_KEY + task id


def add_arguments(p) -> None:
    p.add_argument("--src", default=os.environ.get("GMETA_DEV_DATA", str(DEV_SET)),
                   help="raw MovieLens directory (latest, 100K or 1M layout); default $GMETA_DEV_DATA or "
                        f"{DEV_SET}")
    p.add_argument("--models", default="melu,maml_dnn,metaemb", help="zoo models, comma separated")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="explicit, implicit or both")
    p.add_argument("--cold-users", default=",".join(COLD_RULES), help="time, random or both")
    p.add_argument("--seeds", default="0,1,2", help="training (and random-split) seeds, comma separated")
    p.add_argument("--negatives", type=int, default=100, help="implicit protocol: label-0 rows per query set")
    p.add_argument("--split", default="user_cold", help="the evaluated split")
    p.add_argument("--train-args", default="", help="extra gmeta train flags for every run, one string")
    p.add_argument("--parallel-runs", type=int, default=2, help="training runs at once (one core each)")
    p.add_argument("--out", default="", help="keep the datasets and runs here (default: a removed temp dir)")
    p.add_argument("--reuse", action="store_true",
                   help="with --out: read back the runs a previous call finished there instead of training them")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per training run")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")


def _csv(text: str, allowed=None, flag: str = "") -> list:
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad or not items:
        raise SystemExit(f"gmeta bench coldstart: {flag} {text!r}: choose from {', '.join(allowed or ())}")
    return items


def _run(cmd, timeout: int, log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-3000:])
        raise SystemExit(f"gmeta bench coldstart: {' '.join(map(str, cmd[:3]))} ... failed ({proc.returncode}); "
                         f"log: {log}")


def main(args) -> int:
    models = _csv(args.models, sorted(MODELS), "--models")
    protocols = _csv(args.protocols, PROTOCOLS, "--protocols")
    rules = _csv(args.cold_users, COLD_RULES, "--cold-users")
    try:
        seeds = [int(s) for s in _csv(args.seeds, None, "--seeds")]
    except ValueError:
        raise SystemExit(f"gmeta bench coldstart: --seeds {args.seeds!r}: integers, comma separated") from None
    if args.reuse and not args.out:
        raise SystemExit("gmeta bench coldstart: --reuse needs --out (the directory of the earlier call)")
    if not Path(args.src).is_dir():
        raise SystemExit(f"gmeta bench coldstart: --src {args.src}: not a directory (the raw MovieLens files; "
                         f"set --src or $GMETA_DEV_DATA)")
    if "maml_esmm" in models:
        raise SystemExit("gmeta bench coldstart: maml_esmm needs a conversion label, which MovieLens has not")
    gmeta = Path(sys.executable).parent / "gmeta"
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gmeta_bench_cold_"))
    work.mkdir(parents=True, exist_ok=True)
    settings = [(p, r) for p in protocols for r in rules]
    runs = [(p, r, s, m) for p, r in settings for s in seeds for m in models]
    print(f"gmeta bench coldstart: {len(settings)} settings x {len(seeds)} seeds x {len(models)} models = "
          f"{len(runs)} training runs on {args.src}, in {work}", file=sys.stderr, flush=True)
    try:
        for p, r in settings:
            for s in seeds:
                data = work / f"{p}-{r}-s{s}"
                if args.reuse and (data / "schema.json").is_file():
                    continue
                flags = ["--negatives", args.negatives] if p == "implicit" else []
                _run([gmeta, "convert", "movielens", "--src", args.src, "--out", data, "--cold-users", r,
                      "--seed", s, "--overwrite", "--quiet", *flags], args.timeout, work / f"{data.name}.convert.log")

        def train(run):
            p, r, s, m = run
            out = work / "runs" / f"{p}-{r}-s{s}-{m}"
            done = [d for d in out.iterdir() if (d / "per_task" / f"{args.split}.npz").is_file()] if out.is_dir() else []
            if args.reuse and len(done) == 1:
                return run, load_per_task(str(done[0] / "per_task" / f"{args.split}.npz"))
            shutil.rmtree(out, ignore_errors=True)
            _run([gmeta, "train", "--model", m, "--data", work / f"{p}-{r}-s{s}", "--seed", s,
                  "--tracking-uri", "none", "--no-saved-model", "--checkpoint-dir", "none", "--support-curve",
                  "none", "--eval-splits", args.split, "--output-dir", out, *shlex.split(args.train_args)],
                 args.timeout, work / f"{out.name}.train.log")
            (run_dir,) = [d for d in out.iterdir() if (d / "per_task").is_dir()]
            print(f"  done {p} {r} seed {s} {m}", file=sys.stderr, flush=True)
            return run, load_per_task(str(run_dir / "per_task" / f"{args.split}.npz"))

        with ThreadPoolExecutor(max(1, args.parallel_runs)) as pool:
            per_task = dict(pool.map(train, runs))
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    table = {f"{p}/{r}/{m}": pooled(per_task, [(p, r, s, m) for s in seeds], same_tasks=r == "time")
             for p, r in settings for m in models}
    print(format_table(table, args), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "coldstart", "src": args.src, "split": args.split, "seeds": seeds,
                      "train_args": args.train_args, "results": table}, sort_keys=True), flush=True)
    return 0


def _head(per_task: dict) -> str:
    return headline_of(per_task)


def pooled(per_task: dict, runs: list, n_boot: int = 1000, same_tasks: bool = False) -> dict:
    """Per scorer the seeds' per-task metrics pooled: GAUC and nDCG@10 with intervals, and the
    adapted model minus each other scorer, paired. ``same_tasks``: every seed evaluated the same
    tasks (the time rule), so a task's metrics are averaged over the seeds; otherwise task ids
    are made distinct per seed."""
    merged = {}
    for run in runs:
        pt = per_task[run]
        head = _head(pt)
        for scorer in SCORERS:
            part = pt.get(score_key(head, scorer))
            if part is None:
                continue
            key = np.asarray(part["task_ids"], np.int64) + (0 if same_tasks else run[2] * TASK_KEY)
            into = merged.setdefault(scorer, {})
            for k, v in dict(part, task_ids=key).items():
                into[k] = np.concatenate([into[k], v]) if k in into else np.asarray(v)
    merged = {scorer: _mean_by_task(pt) for scorer, pt in merged.items()}
    out = {}
    for scorer, pt in merged.items():
        summary = summarize(pt, n_boot=n_boot)
        out[scorer] = {m: summary[m] for m in METRICS if m in summary}
        out[scorer]["tasks"] = summary["tasks"]
        if scorer != "adapted":
            out[scorer]["adapted_minus"] = {m: paired_difference(merged["adapted"], pt, m, n_boot=n_boot)
                                            for m in METRICS}
    out["targets"] = targets(out)
    return out


def _mean_by_task(pt: dict) -> dict:
    """Per-task arrays with repeated task ids averaged (NaN-aware), one entry per task id."""
    tasks, index = np.unique(pt["task_ids"], return_inverse=True)
    if tasks.size == index.size:
        return pt
    out = {"task_ids": tasks}
    for k, v in pt.items():
        if k == "task_ids":
            continue
        v = np.asarray(v, np.float64)
        defined = np.isfinite(v)
        total = np.bincount(index, np.where(defined, v, 0.0), tasks.size)
        count = np.bincount(index, defined.astype(np.float64), tasks.size)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def targets(result: dict) -> dict:
    """The issue's quality bars, each with its paired interval's verdict: adapted GAUC at least
    item-kNN and item mean + 0.01 (implicit), at least item mean and the plain network unadapted
    and fine-tuned (explicit); reported for both protocols."""
    bars = {"item_knn": 0.0, "item_mean": 0.01, "plain": 0.0, "plain_finetuned": 0.0}
    out = {}
    for other, margin in bars.items():
        d = result.get(other, {}).get("adapted_minus", {}).get("gauc")
        if d is not None:
            out[f"gauc >= {other}" + (f" + {margin}" if margin else "")] = {
                "diff": d["diff"], "lo": d["lo"], "hi": d["hi"], "met": d["diff"] >= margin,
                "significant": d["significant"]}
    return out


def format_table(table: dict, args) -> str:
    lines = [f"\ncold start on {args.src}, split {args.split}, seeds {args.seeds} pooled (per-task metrics, "
             "95% bootstrap intervals over the pooled tasks)"]
    for metric in METRICS:
        lines += [f"\n{metric}", f"  {'setting':<28}" + "".join(f"{s:>16}" for s in SCORERS)]
        for key, res in table.items():
            cells = "".join(f"{res[s][metric]['value']:>16.4f}" if s in res else f"{'-':>16}" for s in SCORERS)
            lines.append(f"  {key:<28}{cells}")
        lines.append(f"\n  adapted minus, paired [95% interval]\n  {'setting':<28}"
                     + "".join(f"{s:>24}" for s in SCORERS[1:]))
        for key, res in table.items():
            cells = []
            for s in SCORERS[1:]:
                d = res.get(s, {}).get("adapted_minus", {}).get(metric)
                cells.append(f"{d['diff']:+.3f} [{d['lo']:+.3f},{d['hi']:+.3f}]" if d else "-")
            lines.append(f"  {key:<28}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)
