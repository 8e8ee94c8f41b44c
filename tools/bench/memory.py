"""Peak resident memory per worker, 1 worker against 2, for a big row-sharded table.

Launches ``horovodrun -np 1`` and then ``-np 2`` (Gloo, localhost). Every worker notes its
resident set after TensorFlow and Horovod are up (the process baseline), builds the hybrid
embedding of one ``--rows`` x ``--dim`` table (default 4M x 32) with its row optimizer, runs
``--steps`` traced lookup + update steps on Zipf ids, and reports its peak resident set
(``getrusage`` max RSS). ``per_worker_ratio`` is the 2-worker peak / the 1-worker peak (the
process baseline included); ``embedding_ratio`` the same above the baseline, which is what
sharding can change. The table goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from gmeta.trainer.embedding.factory import RowOptimizerConfig, make_embedding
from gmeta.trainer.embedding.plan import ShardingPlan, TableConfig
from gmeta.trainer.parallel.comm import init_communicator
from gmeta.trainer.parallel.launch import horovodrun_command, horovodrun_env

TARGET_RATIO = 0.6


def add_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=4_000_000, help="embedding table rows")
    p.add_argument("--dim", type=int, default=32, help="embedding dimension")
    p.add_argument("--steps", type=int, default=3, help="lookup + update steps")
    p.add_argument("--batch-ids", type=int, default=32 * 74, help="ids per worker per step")
    p.add_argument("--timeout", type=int, default=600, help="seconds per horovodrun job")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(args) -> int:
    for name in ("rows", "dim", "steps", "batch_ids", "timeout"):
        if getattr(args, name) < 1:
            raise SystemExit(f"gmeta bench memory: --{name.replace('_', '-')} must be >= 1")
    config = {"rows": args.rows, "dim": args.dim, "steps": args.steps, "batch_ids": args.batch_ids}
    runs = {n: _launch(n, config, args.timeout) for n in (1, 2)}
    peak = {n: max(r["peak_rss_mb"] for r in runs[n]) for n in runs}
    above = {n: max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs[n]) for n in runs}
    result = {"bench": "memory", "rows": args.rows, "dim": args.dim,
              "table_mb": round(args.rows * args.dim * 4 / 2**20, 1),
              "peak_rss_mb": {str(n): round(peak[n], 1) for n in runs},
              "above_baseline_mb": {str(n): round(above[n], 1) for n in runs},
              "embedding_bytes_per_worker": {str(n): max(r["embedding_bytes"] for r in runs[n]) for n in runs},
              "per_worker_ratio": round(peak[2] / peak[1], 3),
              "embedding_ratio": round(above[2] / above[1], 3) if above[1] > 0 else None,
              "target_per_worker_ratio": TARGET_RATIO}
    out = sys.stderr
    print(f"table {args.rows:,} x {args.dim} fp32 ({result['table_mb']:,} MB) + row optimizer slots", file=out)
    print(f"{'workers':<9}{'peak RSS MB/worker':>20}{'above baseline MB':>19}", file=out)
    for n in runs:
        print(f"{n:<9}{peak[n]:>20,.0f}{above[n]:>19,.0f}", file=out)
    print(f"per-worker ratio 2/1: {result['per_worker_ratio']} (target <= {TARGET_RATIO}); above the process "
          f"baseline: {result['embedding_ratio']}", file=out)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def _launch(n: int, config: dict, timeout: int) -> list:
    out_dir = tempfile.mkdtemp(prefix="gmeta_bench_memory_")
    env = horovodrun_env()
    try:
        cmd = horovodrun_command(n, [sys.executable, "-m", "gmeta.tools.bench.memory", "--worker", out_dir,
                                     "--config", json.dumps(config)])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"gmeta bench memory: horovodrun -np {n} failed ({proc.returncode})")
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(n)]
    except subprocess.TimeoutExpired:
        raise SystemExit(f"gmeta bench memory: -np {n} gave no result within --timeout {timeout} s") from None
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _worker(out_dir: str, config: dict) -> int:
    import tensorflow as tf

    comm = init_communicator("horovod")
    comm.barrier()
    baseline = _current_rss_mb()
    rows, dim = config["rows"], config["dim"]
    plan = ShardingPlan.build([TableConfig("item", rows, dim)], {"item_id": "item"}, comm.size)
    emb = make_embedding("hybrid", plan=plan, comm=comm, seed=0, optimizer=RowOptimizerConfig("adagrad", 0.05))
    w = tf.constant(np.linspace(-1.0, 1.0, dim, dtype=np.float32))

    @tf.function(input_signature=[{"item_id": tf.TensorSpec([None], tf.int64)}])
    def step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.reduce_sum(emb.lookup(ids)["item_id"] * w, -1) - 1.0))
        emb.apply_gradients(tape.gradient(loss, emb.trainable_variables), scale=1.0 / comm.size)
        return loss

    rng = np.random.default_rng([comm.rank, 5])
    for _ in range(config["steps"]):
        ids = ((rng.zipf(1.2, config["batch_ids"]).astype(np.int64) - 1) * 2654435761) % rows
        float(step({"item_id": tf.constant(ids)}))
    comm.barrier()
    Path(out_dir, f"rank{comm.rank}.json").write_text(json.dumps(
        {"baseline_rss_mb": baseline, "peak_rss_mb": _rss_mb(), "embedding_bytes": emb.memory_bytes()}))
    return 0


if __name__ == "__main__":
    from gmeta.tools.common import worker_main

    worker_main("gmeta.tools.bench.memory", _worker)
