"""MeLU on MovieLens-100K-shaped tasks, 2 workers: steady-state tasks/s, second and first order.

With ``--src`` the real MovieLens files are converted (``gmeta convert movielens``); without it
a generated stand-in of the same shape is used (``gmeta datagen``: 466 training users, 3-90
support ratings and 10 query ratings each, 1,682 items). Each order trains ``--epochs`` epochs
under ``horovodrun -np --np`` and the rate is the median of the per-window real-task rates that
``gmeta train`` reports after its first epoch (tracing and padding excluded). The table goes to
stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gmeta.trainer.parallel.launch import horovodrun_command, horovodrun_env

TARGET_TASKS_PER_S = 4260.0
RATE = re.compile(r"epoch (\d+) step \d+/\d+ loss \S+ \(([\d,]+) real tasks/s")


def add_arguments(p) -> None:
    p.add_argument("--src", default="", help="raw MovieLens-100K/-1M directory (default: a generated stand-in)")
    p.add_argument("--np", type=int, default=2, help="Horovod workers")
    p.add_argument("--epochs", type=int, default=4, help="epochs per order (the first is not counted)")
    p.add_argument("--tasks-per-batch", type=int, default=32)
    p.add_argument("--timeout", type=int, default=900, help="seconds per training run")
    p.add_argument("--train-args", default="", help="extra gmeta train flags for both runs, one string")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")


def _run(cmd, timeout, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"gmeta bench movielens: {' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode})")
    return proc


def main(args) -> int:
    if args.np < 1 or args.epochs < 2:
        raise SystemExit("gmeta bench movielens: --np must be >= 1 and --epochs >= 2 (the first is tracing)")
    bin_dir = Path(sys.executable).parent
    gmeta = bin_dir / "gmeta"
    work = Path(tempfile.mkdtemp(prefix="gmeta_bench_ml_"))
    env = horovodrun_env()
    try:
        data = work / "data"
        if args.src:
            _run([gmeta, "convert", "movielens", "--src", args.src, "--out", data], args.timeout, env)
            source = f"MovieLens files in {args.src}"
        else:
            _run([gmeta, "datagen", "--out", data, "--seed", "0", "--train-users", "466", "--cold-users", "50",
                  "--items", "1682", "--cold-items", "50", "--support-min", "3", "--support-max", "90",
                  "--query-size", "10", "--quiet"], args.timeout, env)
            source = "generated stand-in (466 users, 3-90 support + 10 query ratings, 1,682 items)"
        split = "user_cold"
        results = {}
        for name, flags in (("second_order", []), ("first_order", ["--first-order"])):
            proc = _run(horovodrun_command(args.np, [
                gmeta, "train", "--model", "melu", "--data", data, "--epochs", args.epochs,
                "--tasks-per-batch", args.tasks_per_batch, "--log-every", "2", "--tracking-uri", "none",
                "--no-saved-model", "--checkpoint-dir", "none", "--plain-baseline", "off",
                "--validation-split", "none", "--support-curve", "none", "--eval-splits", split,
                "--output-dir", work / "runs", *flags, *shlex.split(args.train_args)]), args.timeout, env)
            rates = [float(r.replace(",", "")) for e, r in RATE.findall(proc.stderr) if int(e) >= 1]
            if not rates:
                raise SystemExit("gmeta bench movielens: no throughput lines after the first epoch (too few steps?)")
            results[name] = {"tasks_per_s": round(statistics.median(rates), 1), "windows": len(rates)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"bench": "movielens", "source": source, "np": args.np, "epochs": args.epochs,
           "train_args": args.train_args, **results,
           "target_second_order_tasks_per_s": TARGET_TASKS_PER_S,
           "meets_target": results["second_order"]["tasks_per_s"] >= TARGET_TASKS_PER_S}
    print(f"MeLU, {source}, {args.np} workers, T={args.tasks_per_batch}", file=sys.stderr)
    for name in ("second_order", "first_order"):
        print(f"  {name.replace('_', ' '):<13} {results[name]['tasks_per_s']:>9,.0f} tasks/s (median of "
              f"{results[name]['windows']} windows after epoch 0)", file=sys.stderr)
    print(f"  target (second order): {TARGET_TASKS_PER_S:,.0f} tasks/s", file=sys.stderr)
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0
