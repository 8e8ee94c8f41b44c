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

``--full``: the whole meta-step instead of the embedding exchange alone: a maml_dnn model (hidden
64,64) whose ``item_id`` feature reads the big table and three small user features their own,
T tasks x (S support + Q query) rows per worker, second-order MAML, the learner's own
``train_step`` (lookup + AlltoAll, inner loop, outer backward, ONE allreduce, Adam, row-wise
update), hybrid against naive on identical batches. JSON adds ``samples_per_s`` / ``tasks_per_s``
per mode and ``speedup`` = hybrid samples/s / naive samples/s.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gmeta.io.schema import Schema, SparseFeature, TableSpec
from gmeta.models.registry import build_model
from gmeta.tools.bench.meta import FIXED_STEP
from gmeta.tools.common import launch_bench
from gmeta.trainer.config import defaults, part_configs
from gmeta.trainer.embedding.build import build_embedding
from gmeta.trainer.embedding.factory import RowOptimizerConfig, make_embedding
from gmeta.trainer.embedding.plan import ShardingPlan, TableConfig
from gmeta.trainer.meta.learner import MetaLearner, batch_spec
from gmeta.trainer.parallel.comm import init_communicator

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
    full: bool = False
    tasks: int = 32
    support: int = 64
    query: int = 10

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
    parser.add_argument("--full", action="store_true",
                        help="time the full meta-step (model, inner loop, allreduce), not only the embedding")
    parser.add_argument("--tasks", type=int, default=32, help="--full: tasks per worker per step")
    parser.add_argument("--support", type=int, default=64, help="--full: support rows per task")
    parser.add_argument("--query", type=int, default=10, help="--full: query rows per task")


def _config(args) -> BenchStepConfig:
    return BenchStepConfig(np=args.np, rows=args.rows, dim=args.dim, batch_ids=args.batch_ids,
                           steps=args.steps, warmup=args.warmup, optimizer=args.optimizer,
                           zipf=args.zipf, seed=args.seed, timeout=args.timeout,
                           json_only=args.json, full=args.full, tasks=args.tasks, support=args.support,
                           query=args.query).validate()


# ---------------------------------------------------------------- launcher (no TF import)
def main(args) -> int:
    cfg = _config(args)

    out_dir = tempfile.mkdtemp(prefix="gmeta_bench_step_")
    try:
        per_rank = launch_bench("step", "gmeta.tools.bench.step", cfg.np, out_dir, asdict(cfg), cfg.timeout)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    result = summarize(cfg, per_rank)
    print(format_table(result), file=sys.stderr if cfg.json_only else sys.stdout, flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def summarize(cfg: BenchStepConfig, per_rank: list) -> dict:
    """Per-worker figures: bytes and memory averaged over ranks, ms the slowest rank's."""
    def mean(mode, key):
        return float(np.mean([r[mode][key] for r in per_rank]))

    def worst(mode, key):
        return float(np.max([r[mode][key] for r in per_rank]))

    hb, nb = mean("hybrid", "bytes_per_step"), mean("naive", "bytes_per_step")
    hm, nm = worst("hybrid", "memory_bytes"), worst("naive", "memory_bytes")
    hms, nms = worst("hybrid", "ms_per_step"), worst("naive", "ms_per_step")
    full = {}
    if cfg.full:
        samples = {m: cfg.np * cfg.tasks * (cfg.support + cfg.query) / (worst(m, "ms_per_step") / 1e3)
                   for m in ("hybrid", "naive")}
        full = {"mode": "full meta-step", "tasks": cfg.tasks, "support": cfg.support, "query": cfg.query,
                "hybrid_samples_per_s": round(samples["hybrid"]), "naive_samples_per_s": round(samples["naive"]),
                "hybrid_tasks_per_s": round(samples["hybrid"] / (cfg.support + cfg.query), 1),
                "naive_tasks_per_s": round(samples["naive"] / (cfg.support + cfg.query), 1)}
    return {
        **full,
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
    if r.get("mode") == "full meta-step":
        return "\n".join([
            f"full meta-step, {r['np']} workers, table {r['rows']:,} x {r['dim']}, T={r['tasks']} S={r['support']} "
            f"Q={r['query']} per worker, {r['steps']} timed steps",
            f"{'mode':<8}{'MB moved/step/worker':>22}{'ms/step':>10}{'samples/s':>12}{'tasks/s':>10}",
            f"{'hybrid':<8}{r['hybrid_bytes_per_step'] / mb:>22.3f}{r['hybrid_ms']:>10.1f}"
            f"{r['hybrid_samples_per_s']:>12,}{r['hybrid_tasks_per_s']:>10,.0f}",
            f"{'naive':<8}{r['naive_bytes_per_step'] / mb:>22.3f}{r['naive_ms']:>10.1f}"
            f"{r['naive_samples_per_s']:>12,}{r['naive_tasks_per_s']:>10,.0f}",
            f"speedup (samples/s) {r['speedup']}x (target >= 20), bytes ratio naive/hybrid {r['bytes_ratio']} "
            f"(target >= 50)",
        ])
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


def full_batch(cfg: BenchStepConfig, rank: int, step: int) -> dict:
    """One worker's meta-batch: Zipf item ids over the big table, uniform small user features."""
    rng = np.random.default_rng([cfg.seed, rank, step, 7])

    def part(n):
        raw = rng.zipf(cfg.zipf, (cfg.tasks, n)).astype(np.int64) - 1
        out = {"item_id": (raw * 2654435761) % cfg.rows}
        for f in FULL_USER_FEATURES:
            out[f] = np.repeat(rng.integers(0, 1000, (cfg.tasks, 1)), n, axis=1)
        out["click"] = rng.integers(0, 2, (cfg.tasks, n)).astype(np.float32)
        out["mask"] = np.ones((cfg.tasks, n), np.float32)
        return out

    return {"support": part(cfg.support), "query": part(cfg.query),
            "task_id": np.arange(cfg.tasks, dtype=np.int64) + rank * cfg.tasks,
            "task_mask": np.ones(cfg.tasks, np.float32)}


FULL_USER_FEATURES = ("user_id", "age", "occupation")


def full_learner(cfg: BenchStepConfig, comm, mode: str):
    """The --full problem's learner: maml_dnn (hidden 64,64), second order, ``mode`` tables."""
    schema = Schema(labels=("click",),
                    sparse=(SparseFeature("item_id", "item_id", group="item"),
                            *(SparseFeature(f, f, group="user") for f in FULL_USER_FEATURES)),
                    tables=(TableSpec("item_id", cfg.rows), *(TableSpec(f, 1000) for f in FULL_USER_FEATURES)),
                    item_id_feature="item_id").validate()
    model_cfg, meta_cfg, row_cfg = part_configs(defaults("maml_dnn", emb_dim=cfg.dim, hidden=(64, 64), seed=cfg.seed,
                                                         emb_optimizer=cfg.optimizer, emb_lr=0.05, **FIXED_STEP))
    model = build_model("maml_dnn", schema, model_cfg)
    emb = build_embedding(model, comm, mode=mode, optimizer=row_cfg, seed=cfg.seed)
    learner = MetaLearner(model, emb, comm, meta_cfg)
    comm.broadcast_variables(learner.dense_variables)
    return learner


def _full_worker(cfg: BenchStepConfig, comm) -> dict:
    """Hybrid vs naive through the learner's own traced train_step on identical batches."""
    import tensorflow as tf

    batches = [tf.nest.map_structure(tf.constant, full_batch(cfg, comm.rank, s))
               for s in range(cfg.warmup + cfg.steps)]
    result = {}
    for mode in ("hybrid", "naive"):
        learner = full_learner(cfg, comm, mode)
        emb = learner.embedding
        step = learner.compiled_train_step(batch_spec(batches[0]))
        for b in batches[:cfg.warmup]:
            float(step(b)["loss"])
        comm.barrier()
        before = comm.counters.snapshot()
        start = time.perf_counter()
        for b in batches[cfg.warmup:]:
            out = step(b)
        float(out["loss"])
        comm.barrier()
        elapsed = time.perf_counter() - start
        delta = comm.counters.delta(before)
        by_kind = {k: delta[k]["bytes"] / cfg.steps for k in delta}
        result[mode] = {"ms_per_step": 1000.0 * elapsed / cfg.steps, "bytes_per_step": sum(by_kind.values()),
                        "by_kind": by_kind, "memory_bytes": emb.memory_bytes(),
                        "unique_ids_per_step": float(np.mean([np.unique(b["support"]["item_id"]).size
                                                              for b in batches[cfg.warmup:]]))}
        del learner, emb, step
        gc.collect()
    return result


def _worker(out_dir: str, cfg: BenchStepConfig) -> int:
    import tensorflow as tf

    comm = init_communicator("horovod")
    if cfg.full:
        Path(out_dir, f"rank{comm.rank}.json").write_text(json.dumps(_full_worker(cfg, comm)))
        return 0
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

        @tf.function(input_signature=[spec], autograph=False)
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
    from gmeta.tools.common import worker_main

    worker_main("gmeta.tools.bench.step", _worker, lambda d: BenchStepConfig(**d))
