"""Hybrid vs naive embedding step: bytes moved, ms/step and embedding memory per worker.

Launches itself under ``horovodrun -np N --gloo`` (``--np``, default 2). Every worker builds one
``--rows`` x ``--dim`` table (default 1M x 32) shared by two features, ``item_id`` and a
3-long ``hist_items`` list (25% padding), and draws Zipf-skewed ids, ``--batch-ids`` per worker
per step (default 32 tasks x 74 samples x 4 ids). Then for each mode, hybrid (row-sharded,
AlltoAll) and naive (replicated, dense all-reduce), it runs a traced step (lookup, loss,
backward, row-wise optimizer) ``--warmup`` times and times ``--steps`` more, reading the
communicator's byte counters for the timed steps. Bytes are those handed to collectives by one
worker per step (ids + vectors + vector gradients for hybrid; the full table gradient plus a row
mask for naive). Prints a table and, as its last line, one JSON object with ``bytes_ratio``
(naive / hybrid bytes), ``memory_ratio`` (naive / hybrid bytes held), ``hybrid_ms``, ``naive_ms``
(with ``--json`` the table goes to stderr, so stdout is only the JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TARGET_BYTES_RATIO = 50.0
HIST = 3


@dataclass(frozen=True)
class BenchStepConfig:
    np: int
    rows: int
    dim: int
    batch_ids: int
    steps: int
    warmup: int
    optimizer: str
    zipf: float
    seed: int
    timeout: int
    json_only: bool

    def validate(self) -> "BenchStepConfig":
        for name in ("np", "rows", "dim", "steps", "timeout"):
            if getattr(self, name) < 1:
                raise SystemExit(f"gmeta bench step: --{name.replace('_', '-')} must be >= 1")
        if self.batch_ids < HIST + 1:
            raise SystemExit(f"gmeta bench step: --batch-ids must be >= {HIST + 1}")
        if self.warmup < 0:
            raise SystemExit("gmeta bench step: --warmup must be >= 0")
        if not self.zipf > 1.0:
            raise SystemExit("gmeta bench step: --zipf must be > 1 (numpy's Zipf exponent)")
        if self.optimizer not in ("sgd", "adagrad", "adam"):
            raise SystemExit("gmeta bench step: --optimizer must be sgd, adagrad or adam")
        return self


def add_arguments(parser) -> None:
    parser.add_argument("--np", type=int, default=2, help="Horovod workers to launch (default 2)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="embedding table rows")
    parser.add_argument("--dim", type=int, default=32, help="embedding dimension")
    parser.add_argument("--batch-ids", type=int, default=32 * 74 * (1 + HIST),
                        help="ids looked up per worker per step (default 32 tasks x 74 samples x 4)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (tracing)")
    parser.add_argument("--optimizer", default="adagrad", help="row optimizer: sgd, adagrad, adam")
    parser.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of the id draw (> 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ids and the table init")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before the run is abandoned")
    parser.add_argument("--json", action="store_true", help="stdout is only the JSON line (table on stderr)")


def _config(args) -> BenchStepConfig:
    return BenchStepConfig(np=args.np, rows=args.rows, dim=args.dim, batch_ids=args.batch_ids,
                           steps=args.steps, warmup=args.warmup, optimizer=args.optimizer,
                           zipf=args.zipf, seed=args.seed, timeout=args.timeout,
                           json_only=args.json).validate()


# ---------------------------------------------------------------- launcher (no TF import)
def main(args) -> int:
    cfg = _config(args)
    out_dir = tempfile.mkdtemp(prefix="gmeta_bench_step_")
    try:
        _launch(cfg, out_dir)
        per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(cfg.np)]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    result = summarize(cfg, per_rank)
    print(format_table(result), file=sys.stderr if cfg.json_only else sys.stdout, flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def _launch(cfg: BenchStepConfig, out_dir: str) -> None:
    bin_dir = Path(sys.executable).parent
    horovodrun = bin_dir / "horovodrun"
    if not horovodrun.exists():
        found = shutil.which("horovodrun")
        if not found:
            raise SystemExit("gmeta bench step: horovodrun not found next to this Python or on PATH")
        horovodrun = Path(found)
    cmd = [str(horovodrun), "-np", str(cfg.np), "-H", f"localhost:{cfg.np}", "--gloo",
           sys.executable, "-m", "gmeta.tools.bench_step", "--worker", out_dir,
           "--config", json.dumps(asdict(cfg))]
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"gmeta bench step: no result within --timeout {cfg.timeout} s") from None
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"gmeta bench step: horovodrun -np {cfg.np} failed ({proc.returncode})")


def summarize(cfg: BenchStepConfig, per_rank: list) -> dict:
    """Per-worker figures: bytes and memory averaged over ranks, ms the slowest rank's."""
    def mean(mode, key):
        return float(np.mean([r[mode][key] for r in per_rank]))

    def worst(mode, key):
        return float(np.max([r[mode][key] for r in per_rank]))

    hb, nb = mean("hybrid", "bytes_per_step"), mean("naive", "bytes_per_step")
    hm, nm = worst("hybrid", "memory_bytes"), worst("naive", "memory_bytes")
    hms, nms = worst("hybrid", "ms_per_step"), worst("naive", "ms_per_step")
    return {
        "bench": "step", "np": cfg.np, "rows": cfg.rows, "dim": cfg.dim,
        "batch_ids": cfg.batch_ids, "steps": cfg.steps, "optimizer": cfg.optimizer, "zipf": cfg.zipf,
        "unique_ids_per_step": mean("hybrid", "unique_ids_per_step"),
        "hybrid_bytes_per_step": round(hb), "naive_bytes_per_step": round(nb),
        "hybrid_bytes_by_kind": {k: round(float(np.mean([r["hybrid"]["by_kind"][k] for r in per_rank])))
                                 for k in per_rank[0]["hybrid"]["by_kind"]},
        "bytes_ratio": round(nb / hb, 2) if hb else None,
        "hybrid_memory_bytes": int(hm), "naive_memory_bytes": int(nm),
        "memory_ratio": round(nm / hm, 3) if hm else None,
        "hybrid_ms": round(hms, 2), "naive_ms": round(nms, 2),
        "speedup": round(nms / hms, 2) if hms else None,
        "target_bytes_ratio": TARGET_BYTES_RATIO,
        "meets_target": bool(hb and nb / hb >= TARGET_BYTES_RATIO),
    }


def format_table(r: dict) -> str:
    mb = 1 << 20
    return "\n".join([
        f"{r['np']} workers, table {r['rows']:,} x {r['dim']}, {r['batch_ids']:,} ids/worker/step "
        f"(~{r['unique_ids_per_step']:,.0f} unique), optimizer {r['optimizer']}, {r['steps']} timed steps",
        f"{'mode':<8}{'MB moved/step/worker':>22}{'ms/step':>10}{'embedding MB/worker':>21}",
        f"{'hybrid':<8}{r['hybrid_bytes_per_step'] / mb:>22.3f}{r['hybrid_ms']:>10.1f}"
        f"{r['hybrid_memory_bytes'] / mb:>21.1f}",
        f"{'naive':<8}{r['naive_bytes_per_step'] / mb:>22.3f}{r['naive_ms']:>10.1f}"
        f"{r['naive_memory_bytes'] / mb:>21.1f}",
        f"bytes ratio naive/hybrid {r['bytes_ratio']} (target >= {r['target_bytes_ratio']:g}), "
        f"memory ratio naive/hybrid {r['memory_ratio']}, speedup {r['speedup']}x",
    ])


# ---------------------------------------------------------------- worker (under horovodrun)
def draw_ids(cfg: BenchStepConfig, rank: int, step: int) -> dict:
    """Zipf-skewed ids; hot ids are scattered over the table (and so over owners) by a
    multiplicative hash, as real id spaces are."""
    rng = np.random.default_rng([cfg.seed, rank, step])
    samples = cfg.batch_ids // (1 + HIST)
    raw = rng.zipf(cfg.zipf, samples * (1 + HIST)).astype(np.int64) - 1
    ids = (raw * 2654435761) % cfg.rows
    item, hist = ids[:samples], ids[samples:].reshape(samples, HIST)
    hist[rng.random(hist.shape) < 0.25] = -1
    return {"item_id": item, "hist_items": hist}


def _worker(out_dir: str, cfg: BenchStepConfig) -> int:
    import gc

    import tensorflow as tf

    from gmeta.trainer.comm import init_communicator
    from gmeta.trainer.embedding import RowOptimizerConfig, make_embedding
    from gmeta.trainer.sharding import ShardingPlan, TableConfig

    comm = init_communicator("horovod")
    plan = ShardingPlan.build([TableConfig("item", cfg.rows, cfg.dim)],
                              {"item_id": "item", "hist_items": "item"}, comm.size)
    w = tf.constant(np.linspace(-1.0, 1.0, cfg.dim, dtype=np.float32))
    batches = [draw_ids(cfg, comm.rank, s) for s in range(cfg.warmup + cfg.steps)]
    # distinct ids of the TIMED steps, the steps the byte counters and timings cover
    flat = [np.concatenate([b["item_id"], b["hist_items"].ravel()]) for b in batches[cfg.warmup:]]
    unique = np.mean([np.unique(f[f >= 0]).size for f in flat])
    spec = {"item_id": tf.TensorSpec([None], tf.int64),
            "hist_items": tf.TensorSpec([None, HIST], tf.int64)}
    result = {}
    for mode in ("hybrid", "naive"):
        emb = make_embedding(mode, plan=plan, comm=comm, seed=cfg.seed,
                             optimizer=RowOptimizerConfig(cfg.optimizer, 0.05))

        @tf.function(input_signature=[spec])
        def step(ids):
            with tf.GradientTape() as tape:
                vecs = emb.lookup(ids)
                s = tf.reduce_sum(vecs["item_id"] * w, -1) + tf.reduce_sum(vecs["hist_items"] * w, [-2, -1])
                loss = tf.reduce_mean(tf.square(s - 1.0))
            # each rank's loss is a mean over its rows: step with 1/N of the sum over ranks
            emb.apply_gradients(tape.gradient(loss, emb.trainable_variables), scale=1.0 / comm.size)
            return loss

        for b in batches[:cfg.warmup]:
            step(b).numpy()
        comm.barrier()
        before = comm.counters.snapshot()
        start = time.perf_counter()
        for b in batches[cfg.warmup:]:
            loss = step(b)
        loss.numpy()
        comm.barrier()
        elapsed = time.perf_counter() - start
        delta = comm.counters.delta(before)
        by_kind = {k: delta[k]["bytes"] / cfg.steps for k in delta}
        result[mode] = {"ms_per_step": 1000.0 * elapsed / cfg.steps,
                        "bytes_per_step": sum(by_kind.values()), "by_kind": by_kind,
                        "memory_bytes": emb.memory_bytes(), "unique_ids_per_step": float(unique)}
        del emb, step
        gc.collect()
    Path(out_dir, f"rank{comm.rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="gmeta.tools.bench_step")
    parser.add_argument("--worker", required=True, help="(internal) output folder of a worker run")
    parser.add_argument("--config", required=True, help="(internal) BenchStepConfig as JSON")
    a = parser.parse_args()
    from gmeta.trainer.launch import run_guarded

    sys.exit(run_guarded(_worker, a.worker, BenchStepConfig(**json.loads(a.config))))
