"""``gmeta bench NAME`` (io, step, meta, memory, projection, movielens, breakdown, hot, coldstart, scaling): benchmarks.

Each prints a table and, as its last line, one JSON object."""

from __future__ import annotations

import importlib

BENCHES = {
    "io": "gmeta.tools.bench.reader",      # reader rows/s vs raw pyarrow decode
    "step": "gmeta.tools.bench.step",  # hybrid vs naive embedding step: bytes and memory per worker
    "meta": "gmeta.tools.bench.meta",  # meta-step speed: vectorized inner loop vs task-by-task loop
    "memory": "gmeta.tools.bench.memory",  # peak resident memory per worker, 1 vs 2 workers
    "projection": "gmeta.tools.bench.projection",  # a model: throughput at 8-64 workers
    "movielens": "gmeta.tools.bench.movielens",  # MeLU tasks/s on MovieLens-100K-shaped tasks
    "breakdown": "gmeta.tools.bench.breakdown",  # where a meta-step's time goes (profiler trace)
    "hot": "gmeta.tools.bench.hot",  # tiered embeddings (hot rows replicated) vs plain sharding
    "coldstart": "gmeta.tools.bench.coldstart",  # quality on real data: models vs popularity, item-kNN, plain
    "scaling": "gmeta.tools.bench.scaling",  # step time and memory against T, S, dim, rows, workers
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_bench_module=module)


def main(args) -> int:
    return int(importlib.import_module(args._bench_module).main(args) or 0)
