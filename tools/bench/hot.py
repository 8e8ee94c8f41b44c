"""Tiered embeddings (hot rows replicated, the tail sharded) against plain hybrid sharding.

For each worker count (``--nps``, one horovodrun launch each), Zipf exponent (``--zipfs``) and
batch size (``--batches``, ids looked up per worker per step), workers draw Zipf-skewed ids over
one ``--rows`` x ``--dim`` table (hot ids scattered over owners by a multiplicative hash), pick
the hot rows from a profile of separate draws (``gmeta.trainer.embedding.tiering.choose_hot``, the top
``--shares`` of rows) and time a traced embedding step (lookup, loss, backward, row-wise
update; the median of ``--steps`` steps) for no tiering and for tiering with the sparse and the
dense sync.

Bytes are counted two ways. ``wire``: what crosses between workers, summed over workers and
divided by their number (ids, vectors and gradients of rows fetched from another worker's shard;
the hot sync: each touched hot row's (table, position, gradient) to every other worker for the
sparse sync, a ring allreduce of the hot table plus a touch count for the dense one), computed
from the batches. ``handed``: the communicator's counters (tensors handed to collectives,
including rows a worker sends to itself). The JSON's ``reduction`` is the fraction of wire bytes
saved at the best hot share <= 1% on Zipf(1.2) with 2 workers, ``step_speedup`` the step-time
ratio (no tiering / tiering) there.
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

from gmeta.tools.common import launch_bench
from gmeta.trainer.embedding.factory import RowOptimizerConfig, make_embedding
from gmeta.trainer.embedding.plan import ShardingPlan, TableConfig
from gmeta.trainer.embedding.tiering import TableProfile, choose_hot
from gmeta.trainer.parallel.comm import init_communicator

HASH = 2654435761


@dataclass(frozen=True)
class BenchHotConfig:
    nps: tuple = (2, 3)
    zipfs: tuple = (1.05, 1.2)
    batches: tuple = (2048, 16384)
    shares: tuple = (0.001, 0.01)
    rows: int = 1_000_000
    dim: int = 32
    steps: int = 10
    warmup: int = 2
    optimizer: str = "adagrad"
    seed: int = 0
    timeout: int = 900

    def validate(self) -> "BenchHotConfig":
        if not self.nps or min(self.nps) < 1:
            raise SystemExit("gmeta bench hot: --nps must list worker counts >= 1")
        if not self.zipfs or min(self.zipfs) <= 1.0:
            raise SystemExit("gmeta bench hot: --zipfs must be > 1 (numpy's Zipf exponent)")
        if not self.batches or min(self.batches) < 1:
            raise SystemExit("gmeta bench hot: --batches must be >= 1")
        if not self.shares or not all(0 < s <= 1 for s in self.shares):
            raise SystemExit("gmeta bench hot: --shares must lie in (0, 1]")
        if self.rows < 1 or self.dim < 1 or self.steps < 1 or self.warmup < 0:
            raise SystemExit("gmeta bench hot: --rows, --dim, --steps must be >= 1, --warmup >= 0")
        if self.optimizer not in ("sgd", "adagrad", "adam"):
            raise SystemExit("gmeta bench hot: --optimizer must be sgd, adagrad or adam")
        return self


def _floats(text):
    return tuple(float(x) for x in str(text).split(",") if x)


def _ints(text):
    return tuple(int(x) for x in str(text).split(",") if x)


def add_arguments(parser) -> None:
    d = BenchHotConfig()
    parser.add_argument("--nps", type=_ints, default=d.nps, help="worker counts, one launch each (default 2,3)")
    parser.add_argument("--zipfs", type=_floats, default=d.zipfs, help="Zipf exponents (default 1.05,1.2)")
    parser.add_argument("--batches", type=_ints, default=d.batches,
                        help="ids looked up per worker per step (default 2048,16384)")
    parser.add_argument("--shares", type=_floats, default=d.shares,
                        help="hot shares of the table's rows (default 0.001,0.01; 0 always runs)")
    parser.add_argument("--rows", type=int, default=d.rows, help="table rows (default 1M)")
    parser.add_argument("--dim", type=int, default=d.dim, help="embedding dimension (default 32)")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per setting (tracing)")
    parser.add_argument("--optimizer", default=d.optimizer, help="row optimizer: sgd, adagrad, adam")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the ids and the table")
    parser.add_argument("--timeout", type=int, default=d.timeout, help="seconds per horovodrun launch")
    parser.add_argument("--json", action="store_true", help="stdout is only the JSON line (table on stderr)")


def main(args) -> int:
    cfg = BenchHotConfig(nps=args.nps, zipfs=args.zipfs, batches=args.batches, shares=args.shares,
                         rows=args.rows, dim=args.dim, steps=args.steps, warmup=args.warmup,
                         optimizer=args.optimizer, seed=args.seed, timeout=args.timeout).validate()
    rows = []
    settings = len(cfg.zipfs) * len(cfg.batches) * (1 + 2 * len(cfg.shares))
    for n in cfg.nps:
        print(f"[gmeta bench hot] {n} workers: {settings} settings of {cfg.warmup + cfg.steps} steps each",
              file=sys.stderr, flush=True)
        out_dir = tempfile.mkdtemp(prefix="gmeta_bench_hot_")
        try:
            per_rank = launch_bench("hot", "gmeta.tools.bench.hot", n, out_dir, asdict(cfg), cfg.timeout)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        rows += combine(per_rank)
    result = summarize(cfg, rows)
    print(format_table(result), file=sys.stderr if args.json else sys.stdout, flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def combine(per_rank: list) -> list:
    """One row per setting: wire bytes (already global) from rank 0, handed bytes averaged over
    ranks, ms the slowest rank's (each rank's median step)."""
    out = []
    for k, row in enumerate(per_rank[0]):
        row = dict(row)
        row["ms_per_step"] = max(r[k]["ms_per_step"] for r in per_rank)
        row["handed"] = {kind: float(np.mean([r[k]["handed"][kind] for r in per_rank])) for kind in row["handed"]}
        out.append(row)
    return out


def summarize(cfg: BenchHotConfig, rows: list) -> dict:
    for row in rows:
        base = next(r for r in rows if (r["np"], r["zipf"], r["batch"], r["share"]) ==
                    (row["np"], row["zipf"], row["batch"], 0.0))
        row["wire_total"] = sum(row["wire"].values())
        row["saving"] = round(1.0 - row["wire_total"] / max(sum(base["wire"].values()), 1.0), 4)
        row["speedup"] = round(base["ms_per_step"] / row["ms_per_step"], 3)
    pick = [r for r in rows if r["np"] == 2 and abs(r["zipf"] - 1.2) < 1e-9 and 0 < r["share"] <= 0.01]
    best = max(pick, key=lambda r: r["saving"]) if pick else None
    return {"bench": "hot", "rows": cfg.rows, "dim": cfg.dim, "optimizer": cfg.optimizer, "steps": cfg.steps,
            "settings": rows,
            "reduction": best["saving"] if best else None,
            "step_speedup": best["speedup"] if best else None,
            "best": {k: best[k] for k in ("np", "zipf", "batch", "share", "sync")} if best else None,
            "target_reduction": 0.4}


def format_table(r: dict) -> str:
    lines = [f"table {r['rows']:,} x {r['dim']}, {r['optimizer']}, {r['steps']} timed steps; wire KB per worker "
             f"per step (ids / vectors / grads / hot sync), saving vs no tiering, step time",
             f"{'np':>3}{'zipf':>6}{'batch':>7}{'hot':>7}{'sync':>8}{'hot rows':>9}{'hot hits':>9}"
             f"{'ids':>8}{'vec':>8}{'grad':>8}{'sync':>8}{'total':>9}{'saving':>8}{'ms':>8}{'speedup':>8}"]
    for s in r["settings"]:
        w = {k: v / 1024 for k, v in s["wire"].items()}
        lines.append(f"{s['np']:>3}{s['zipf']:>6}{s['batch']:>7}{s['share']:>7.1%}{s['sync']:>8}{s['hot_rows']:>9,}"
                     f"{s['hot_hit']:>9.1%}{w['ids']:>8.1f}{w['vectors']:>8.1f}{w['grads']:>8.1f}{w['hot_sync']:>8.1f}"
                     f"{s['wire_total'] / 1024:>9.1f}{s['saving']:>8.1%}{s['ms_per_step']:>8.1f}{s['speedup']:>8.2f}")
    lines.append(f"reduction at the best hot share <= 1% (Zipf 1.2, 2 workers): {r['reduction']} "
                 f"(target >= 0.4), step speedup {r['step_speedup']}; best setting {r['best']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- worker (under horovodrun)
def draw(cfg: BenchHotConfig, zipf: float, batch: int, rank: int, step: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, int(zipf * 1000), batch, rank, step])
    return ((rng.zipf(zipf, batch).astype(np.int64) - 1) * HASH) % cfg.rows


def wire_bytes(cfg, batches_by_rank, hot: np.ndarray, sync: str, n: int) -> dict:
    """Bytes crossing between workers per step, summed over workers / n (module docstring)."""
    d = cfg.dim
    out = dict.fromkeys(("ids", "vectors", "grads", "hot_sync"), 0.0)
    for r, ids in enumerate(batches_by_rank):
        uniq = np.unique(ids)
        is_hot = np.isin(uniq, hot)
        remote = np.count_nonzero((uniq % n != r) & ~is_hot)
        out["ids"] += 8 * remote
        out["vectors"] += 4 * d * remote
        out["grads"] += 4 * d * remote
        if sync == "sparse":
            out["hot_sync"] += 4 * (d + 2) * np.count_nonzero(is_hot) * (n - 1)
    if sync == "dense":
        out["hot_sync"] += 2 * (n - 1) * 4 * (d + 1) * hot.size
    return {k: v / n for k, v in out.items()}


def _worker(out_dir: str, cfg: BenchHotConfig) -> int:
    import tensorflow as tf

    comm = init_communicator("horovod")
    n, rank = comm.size, comm.rank
    plan = ShardingPlan.build([TableConfig("item", cfg.rows, cfg.dim)], {"item_id": "item"}, n)
    spec = {"item_id": tf.TensorSpec([None], tf.int64)}
    results = []
    for zipf in cfg.zipfs:
        for batch in cfg.batches:
            # the profile: separate draws (steps 1000+), counted the way `gmeta profile` counts
            sample = np.concatenate([draw(cfg, zipf, batch, r, 1000 + s) for r in range(n) for s in range(8)])
            rows, counts = np.unique(sample, return_counts=True)
            order = np.lexsort((rows, -counts))
            profile = TableProfile("item", cfg.rows, rows[order], counts[order])
            steps = [[draw(cfg, zipf, batch, r, s) for r in range(n)] for s in range(cfg.warmup + cfg.steps)]
            settings = [(0.0, "off")] + [(s, sync) for s in cfg.shares for sync in ("sparse", "dense")]
            for share, sync in settings:
                hot = choose_hot({"item": profile}, {"item": cfg.dim}, -1, 1, max_share=share)["item"] \
                    if share else np.zeros(0, np.int64)
                emb = make_embedding("hybrid", plan=plan, comm=comm, seed=cfg.seed,
                                     optimizer=RowOptimizerConfig(cfg.optimizer, 0.05),
                                     hot_rows={"item": hot} if share else None,
                                     hot_sync=sync if share else "sparse")

                @tf.function(input_signature=[spec], autograph=False)
                def step(ids, emb=emb):
                    with tf.GradientTape() as tape:
                        v = emb.lookup(ids)["item_id"]
                        loss = 0.5 * tf.reduce_sum(tf.square(v - 0.1))
                    emb.apply_gradients(tape.gradient(loss, emb.trainable_variables), scale=1.0 / n)
                    return loss

                feeds = [{"item_id": tf.constant(s[rank])} for s in steps]
                for f in feeds[:cfg.warmup]:
                    step(f).numpy()
                comm.barrier()
                before = comm.counters.snapshot()
                times = []
                for f in feeds[cfg.warmup:]:
                    start = time.perf_counter()
                    step(f).numpy()
                    times.append(time.perf_counter() - start)
                delta = comm.counters.delta(before)
                wires = [wire_bytes(cfg, s, hot, sync, n) for s in steps[cfg.warmup:]]
                hits = np.mean([np.isin(s[rank], hot).mean() for s in steps[cfg.warmup:]])
                results.append({
                    "np": n, "zipf": zipf, "batch": batch, "share": share, "sync": sync, "hot_rows": int(hot.size),
                    "hot_hit": float(hits), "ms_per_step": 1000.0 * float(np.median(times)),
                    "wire": {k: float(np.mean([w[k] for w in wires])) for k in wires[0]},
                    "handed": {k: delta[k]["bytes"] / cfg.steps for k in delta},
                    "memory_bytes": emb.memory_bytes()})
                del emb, step
                gc.collect()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    from gmeta.tools.common import worker_main

    worker_main("gmeta.tools.bench.hot", _worker,
                lambda d: BenchHotConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}))
