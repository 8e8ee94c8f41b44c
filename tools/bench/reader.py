"""Meta-IO throughput: whole-reader rows/s (through to tf.data meta-batches) vs raw pyarrow ORC decode.

Both read the same files in the same run. Raw decode is ``ORCFile.read_stripe`` of every stripe
with all columns, on one thread and on as many threads as the reader uses; the reader figure
counts only real rows delivered (mask sums) after a full epoch through ``MetaReader.dataset``,
iterated inside a tf.function: the packed batches training reads (``ratio``), and the
interface's dict batches (``ratio_dict``; an eager Python loop over them is reported too).
``ratio`` = reader rows/s over raw rows/s at the same thread count; ``cpu_ratio`` compares rows per CPU
second (all threads), which a shared, busy host disturbs less. Passes are interleaved and the
best of ``--repeat`` is kept. Without ``--data`` a
temporary dataset with DESIGN.md's 19-column schema (task id, flag, label, 12 int64 ids,
4 floats) is generated and removed afterwards. ``stages_ms_per_1m_rows``: the reader's stages
timed one after the other on one thread (``stage_profile``). Prints a table and, as its last line, one JSON
object (with ``--json`` the table goes to stderr, so stdout is only the JSON line).

``--input-wait``: instead, the input-wait share of a real training run, the demo's (``gmeta
datagen`` defaults, MeLU, ``horovodrun -np 2``, 2 epochs, no tracking): the time each step waits
for its batch over the step's total, as the run reports it (JSON ``input_wait_fraction``,
target < 0.02), and what it is made of: the epochs' first steps apart, and a histogram of the
other steps' waits (steps and share of step time per bin).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from gmeta.io.assemble import build_block
from gmeta.io.reader import MetaReader
from gmeta.io.schema import DenseFeature, Schema, SparseFeature, TableSpec
from gmeta.io.stripes import OrcFileCache, read_stripe
from gmeta.io.writer import TaskWriter, write_dataset_schema
from gmeta.trainer.parallel.launch import horovodrun_command, horovodrun_env

ID_VOCABS = (("item_id", 200_000), ("item_category", 1_000), ("item_brand", 20_000), ("item_shop", 50_000),
             ("age", 10), ("gender", 3), ("occupation", 30), ("city", 400), ("device", 50), ("hour", 24),
             ("weekday", 7))
DENSE = ("price", "user_activity", "item_ctr", "position")


@dataclass(frozen=True)
class BenchIoConfig:
    data: Optional[str]
    split: str
    rows: int
    tasks_per_batch: int
    support_size: int
    query_size: int
    parallel_reads: int
    repeat: int
    rows_per_stripe: int
    compression: str
    seed: int
    json_only: bool

    def validate(self) -> "BenchIoConfig":
        for name in ("rows", "tasks_per_batch", "support_size", "query_size", "parallel_reads", "repeat",
                     "rows_per_stripe"):
            if getattr(self, name) < 1:
                raise SystemExit(f"gmeta bench io: --{name.replace('_', '-')} must be >= 1")
        return self


def add_arguments(parser) -> None:
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="existing Meta-IO dataset (default: generate a temporary one of --rows rows)")
    parser.add_argument("--split", default="train", help="split to read (default: train)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated dataset")
    parser.add_argument("--tasks-per-batch", type=int, default=32, help="T: tasks per meta-batch")
    parser.add_argument("--support-size", type=int, default=64, help="S: support rows per task")
    parser.add_argument("--query-size", type=int, default=16, help="Q: query rows per task")
    parser.add_argument("--parallel-reads", type=int, default=2, help="reader threads (and raw decode threads)")
    parser.add_argument("--repeat", type=int, default=2, help="passes of each measurement; the best is kept")
    parser.add_argument("--rows-per-stripe", type=int, default=65536, help="stripe size of the generated dataset")
    parser.add_argument("--compression", default="zstd", help="compression of the generated dataset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated dataset and the shuffle")
    parser.add_argument("--json", action="store_true", help="stdout is only the JSON line (table on stderr)")
    parser.add_argument("--input-wait", action="store_true",
                        help="measure the input-wait share of a demo training run (2 workers) instead")


def bench_schema():
    """DESIGN.md's 19 columns: task id, flag, one label, 12 int64 ids, 4 floats."""
    ids = (("user_id", 1 << 20),) + ID_VOCABS
    return Schema(labels=("click",),
                  sparse=tuple(SparseFeature(n, n, group="user" if n in ("user_id", "age", "gender", "occupation")
                                             else "item" if n.startswith("item") else "context") for n, _ in ids),
                  dense=tuple(DenseFeature(n) for n in DENSE),
                  tables=tuple(TableSpec(n, v, hashed=(n == "user_id")) for n, v in ids),
                  item_id_feature="item_id")


def generate(out: str, rows: int, rows_per_stripe: int, compression: str, seed: int) -> int:
    """Write ~``rows`` rows of tasks with 32-64 support and 8-16 query rows; returns rows written."""
    schema = bench_schema()
    rng = np.random.default_rng(seed)
    n_tasks = max(1, rows // 60)
    n_sup = rng.integers(32, 65, n_tasks)
    n_qry = rng.integers(8, 17, n_tasks)
    lens = n_sup + n_qry
    written = 0
    with TaskWriter(out, schema, split="train", rows_per_stripe=rows_per_stripe, compression=compression) as w:
        for lo in range(0, n_tasks, 2000):  # whole tasks per write() call
            hi = min(n_tasks, lo + 2000)
            ln = lens[lo:hi]
            tid = np.repeat(np.arange(lo, hi, dtype=np.int64), ln)
            n = tid.size
            starts = np.repeat(np.cumsum(ln) - ln, ln)
            pos = np.arange(n) - starts
            cols = {"task_id": tid, "is_query": (pos >= np.repeat(n_sup[lo:hi], ln)).astype(np.int8),
                    "click": (rng.random(n) < 0.1).astype(np.float32), "user_id": tid}
            for name, vocab in ID_VOCABS:
                cols[name] = rng.integers(0, vocab, n)
            for name in DENSE:
                cols[name] = rng.random(n, dtype=np.float32)
            w.write(pa.table({name: cols[name] for name in schema.column_names()}))
            written += n
    write_dataset_schema(out, schema)
    return written


def raw_decode(units, threads: int) -> tuple:
    """(rows, wall seconds, CPU seconds) to decode every stripe, all columns, on ``threads`` threads."""
    cache = OrcFileCache()

    def one(unit):
        return cache.get(unit.file).read_stripe(unit.stripe).num_rows

    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        rows = sum(pool.map(one, units))
    return rows, time.perf_counter() - t0, time.process_time() - c0


def _graph_counter():
    """A tf.function that iterates a dataset in graph mode and sums the masks (real rows)."""
    import tensorflow as tf

    @tf.function
    def count(ds):
        rows = tf.constant(0.0, tf.float64)
        batches = tf.constant(0, tf.int64)
        for b in ds:
            rows += tf.cast(tf.reduce_sum(b["support"]["mask"]) + tf.reduce_sum(b["query"]["mask"]), tf.float64)
            batches += 1
        return rows, batches

    return count


def reader_pass(cfg: BenchIoConfig, data: str, epoch: int, counter=None, packed: bool = False) -> tuple:
    """(real rows delivered, wall seconds, CPU seconds, batches, reader) for one epoch through
    tf.data; iterated inside a tf.function when ``counter`` is given, else eagerly from Python;
    ``packed``: the packed batches training reads (a few arrays per batch, unpacked in its step)."""
    reader = MetaReader(data, split=cfg.split, tasks_per_batch=cfg.tasks_per_batch, support_size=cfg.support_size,
                        query_size=cfg.query_size, shuffle=True, seed=cfg.seed,
                        num_parallel_reads=cfg.parallel_reads, prefetch=2)
    ds = reader.dataset(epoch, packed=packed)
    t0, c0 = time.perf_counter(), time.process_time()
    if counter is not None:
        rows, batches = (int(v.numpy()) for v in counter(ds))
    else:
        rows = batches = 0
        for batch in ds:
            rows += int(batch["support"]["mask"].numpy().sum() + batch["query"]["mask"].numpy().sum())
            batches += 1
    return rows, time.perf_counter() - t0, time.process_time() - c0, batches, reader


def stage_profile(cfg: BenchIoConfig, data: str, counter) -> dict:
    """Milliseconds per 1M rows of each stage of the reader, one after the other on one thread
    (best of ``--repeat``, at least 3): ``decode`` (pyarrow, the reader's columns), ``blocks``
    (validated row-major blocks), ``pool`` (shuffle pools and their batches' row numbers),
    ``tensorflow`` (the same windows, precomputed, through the reader's tf.data pipeline:
    hand-off, row gathers, batches, counted in a traced loop) and, apart, ``loop`` (that traced
    loop over as many trivial elements: its own share of ``tensorflow``)."""
    import tensorflow as tf

    reader = MetaReader(data, split=cfg.split, tasks_per_batch=cfg.tasks_per_batch, support_size=cfg.support_size,
                        query_size=cfg.query_size, shuffle=True, seed=cfg.seed, num_parallel_reads=1, prefetch=2)
    lay, units, cache = reader._layout, reader.unit_order(0), OrcFileCache()
    best = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        return out

    for _ in range(max(cfg.repeat, 3)):  # (the first pass also pays for fresh memory)
        batches = timed("decode", lambda: [read_stripe(cache.get(u.file), u.file, u.stripe, lay.columns)
                                           for u in units])
        blocks = timed("blocks", lambda: [build_block(b, lay, reader.S, reader.Q, "", 0) for b in batches])
        # each later stage reads the one before it precomputed (instance attributes shadow the methods)
        reader._blocks = lambda executor, order: iter(blocks)
        windows = timed("pool", lambda: list(reader.windows(0)))
        reader.windows = lambda epoch=0: iter(windows)
        ds = reader.dataset(0, packed=True)
        timed("tensorflow", lambda: counter(ds))
        trivial = tf.data.Dataset.range(reader.steps_per_epoch).map(
            lambda i: {"support": {"mask": tf.zeros([1])}, "query": {"mask": tf.zeros([1])}})
        timed("loop", lambda: counter(trivial))
        del reader._blocks, reader.windows
    per_m = 1e9 / max(sum(u.rows for u in units), 1)  # seconds -> ms per 1M rows
    return {k: round(v * per_m, 1) for k, v in best.items()}


def run(cfg: BenchIoConfig) -> dict:
    import tensorflow as tf  # noqa: F401  (imported before timing so its start-up is not measured)

    tmp = None
    data = cfg.data
    try:
        gen_s = None
        if data is None:
            tmp = tempfile.mkdtemp(prefix="gmeta-bench-io-")
            data = tmp
            t0 = time.perf_counter()
            generate(data, cfg.rows, cfg.rows_per_stripe, cfg.compression, cfg.seed)
            gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = MetaReader(data, split=cfg.split, tasks_per_batch=cfg.tasks_per_batch,
                          support_size=cfg.support_size, query_size=cfg.query_size)
        plan_s = time.perf_counter() - t0
        counter = _graph_counter()
        kinds = {"raw1": lambda e: raw_decode(plan.units, 1),
                 "rawn": lambda e: raw_decode(plan.units, cfg.parallel_reads),
                 "graph": lambda e: reader_pass(cfg, data, e, counter),
                 "packed": lambda e: reader_pass(cfg, data, e, counter, packed=True),
                 "eager": lambda e: reader_pass(cfg, data, e)}
        runs = {k: [] for k in kinds}
        for e in range(cfg.repeat):  # interleaved, so a busy moment on a shared host hits all kinds
            for k, f in kinds.items():
                runs[k].append(f(e))
        stages = stage_profile(cfg, data, counter)
        best = {k: min(v, key=lambda r: r[1]) for k, v in runs.items()}
        rate = {k: best[k][0] / best[k][1] for k in kinds}              # rows per wall second
        cpu_rate = {k: best[k][0] / max(min(r[2] for r in runs[k]), 1e-9) for k in kinds}  # rows per CPU s
        rows, batches, reader = best["graph"][0], best["graph"][3], best["graph"][4]
        for kind in ("eager", "packed"):
            if (best[kind][0], best[kind][3]) != (rows, batches):
                raise RuntimeError(f"{kind} and graph passes disagree: {best[kind][0]} vs {rows} rows")
        return {
            "raw_rows_per_s": round(rate["rawn"]), "reader_rows_per_s": round(rate["packed"]),
            "ratio": round(rate["packed"] / rate["rawn"], 4),
            "reader_rows_per_s_dict": round(rate["graph"]), "ratio_dict": round(rate["graph"] / rate["rawn"], 4),
            "raw_rows_per_s_1thread": round(rate["raw1"]), "ratio_vs_1thread": round(rate["packed"] / rate["raw1"], 4),
            "reader_rows_per_s_eager": round(rate["eager"]), "ratio_eager": round(rate["eager"] / rate["rawn"], 4),
            "raw_rows_per_cpu_s": round(cpu_rate["raw1"]), "reader_rows_per_cpu_s": round(cpu_rate["packed"]),
            "cpu_ratio": round(cpu_rate["packed"] / cpu_rate["raw1"], 4),
            "reader_rows_per_cpu_s_dict": round(cpu_rate["graph"]),
            "threads": cfg.parallel_reads, "rows_in_files": best["raw1"][0], "rows_delivered": rows,
            "rows_dropped": int(reader.stats["support_rows_dropped"] + reader.stats["query_rows_dropped"]),
            "batches": batches, "steps_per_epoch": reader.steps_per_epoch, "stripes": len(plan.units),
            "tasks_per_batch": cfg.tasks_per_batch, "support_size": cfg.support_size,
            "query_size": cfg.query_size, "plan_s": round(plan_s, 4), "stages_ms_per_1m_rows": stages,
            "generate_s": None if gen_s is None else round(gen_s, 2),
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def format_table(r: dict) -> str:
    lines = [f"{'measurement':<34}{'rows/s':>14}",
             f"{'raw pyarrow decode, 1 thread':<34}{r['raw_rows_per_s_1thread']:>14,}",
             f"{'raw pyarrow decode, ' + str(r['threads']) + ' threads':<34}{r['raw_rows_per_s']:>14,}",
             f"{'MetaReader -> tf.data, packed':<34}{r['reader_rows_per_s']:>14,}",
             f"{'MetaReader -> tf.data, dicts':<34}{r['reader_rows_per_s_dict']:>14,}",
             f"{'MetaReader dicts, eager loop':<34}{r['reader_rows_per_s_eager']:>14,}",
             f"{'raw decode, rows per CPU second':<34}{r['raw_rows_per_cpu_s']:>14,}",
             f"{'MetaReader packed, per CPU second':<34}{r['reader_rows_per_cpu_s']:>14,}",
             f"{'MetaReader dicts, per CPU second':<34}{r['reader_rows_per_cpu_s_dict']:>14,}",
             f"ratio reader / raw ({r['threads']} threads): {r['ratio']:.3f} packed (what training reads), "
             f"{r['ratio_dict']:.3f} dicts, {r['ratio_eager']:.3f} dicts in an eager loop; vs 1-thread raw "
             f"{r['ratio_vs_1thread']:.3f}; per CPU second {r['cpu_ratio']:.3f}",
             f"{r['rows_in_files']:,} rows in {r['stripes']} stripes; {r['rows_delivered']:,} delivered in "
             f"{r['batches']} batches of T={r['tasks_per_batch']}, S={r['support_size']}, Q={r['query_size']} "
             f"({r['rows_dropped']:,} dropped past the caps); plan {r['plan_s']} s",
             "stages, ms per 1M rows on one thread: " + ", ".join(f"{k} {v:g}" for k, v in
                                                                   r["stages_ms_per_1m_rows"].items())]
    return "\n".join(lines)


def input_wait(seed: int, timeout: int = 900) -> dict:
    """The demo's training run on generated data: its reported input-wait share of step time."""
    bin_dir = Path(sys.executable).parent
    root = tempfile.mkdtemp(prefix="gmeta_bench_wait_")
    env = horovodrun_env(one_thread=True)
    try:
        subprocess.run([str(bin_dir / "gmeta"), "datagen", "--out", f"{root}/data", "--seed", str(seed), "--quiet"],
                       check=True, env=env, timeout=timeout)
        cmd = horovodrun_command(2, [bin_dir / "gmeta", "train", "--model", "melu", "--data", f"{root}/data",
                                     "--epochs", "2", "--tracking-uri", "none", "--output-dir", f"{root}/runs",
                                     "--no-saved-model", "--checkpoint-dir", "none", "--support-curve", "none",
                                     "--log-every", "0"])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    found = re.search(r"input wait: ([0-9.]+)% of step time \(([0-9.]+)% at (\d+) epoch starts; the other steps "
                      r"waited ([0-9.]+) ms on average\); by wait: (\{.*\})", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        sys.stderr.write((proc.stdout + proc.stderr)[-4000:])
        raise SystemExit(f"gmeta bench io --input-wait: the training run failed ({proc.returncode})")
    fraction = float(found.group(1)) / 100
    return {"bench": "io_input_wait", "run": "demo data, melu, 2 workers, 2 epochs (rank 0)",
            "input_wait_fraction": fraction, "target": 0.02, "meets_target": fraction < 0.02,
            "epoch_starts_share": float(found.group(2)) / 100, "epoch_starts": int(found.group(3)),
            "mean_wait_ms_other_steps": float(found.group(4)),
            "histogram_steps_and_share": json.loads(found.group(5))}


def main(args) -> int:
    if args.input_wait:
        result = input_wait(args.seed)
        print(f"input wait of a demo training run (MeLU, 2 workers, 2 epochs): "
              f"{result['input_wait_fraction']:.1%} of step time (target < 2%); "
              f"{result['epoch_starts_share']:.1%} at {result['epoch_starts']} epoch starts, the other steps "
              f"{result['mean_wait_ms_other_steps']:.2f} ms each on average; steps and share of step time by wait: "
              f"{result['histogram_steps_and_share']}",
              file=sys.stderr if args.json else sys.stdout, flush=True)
        print(json.dumps(result, sort_keys=True), flush=True)
        return 0
    cfg = BenchIoConfig(data=args.data, split=args.split, rows=args.rows, tasks_per_batch=args.tasks_per_batch,
                        support_size=args.support_size, query_size=args.query_size,
                        parallel_reads=args.parallel_reads, repeat=args.repeat,
                        rows_per_stripe=args.rows_per_stripe, compression=args.compression, seed=args.seed,
                        json_only=args.json).validate()
    result = run(cfg)
    print(format_table(result), file=sys.stderr if cfg.json_only else sys.stdout, flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
