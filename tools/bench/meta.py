"""Meta-step speed: the vectorized inner loop against the task-by-task loop, one process.

Builds a MeLU-sized problem (fields x dim embeddings in tables placed as ``gmeta train`` places
them, MLP hidden sizes, T tasks of S support and Q query rows), times compiled ``train_step``
calls and reports ms/step, tasks/s, samples/s and an analytic GFLOP/s. FLOPs per meta-step are counted for the MLP only, as
``F = 2 * sum(in*out)`` per row forward, ``3F`` per row for a forward+backward pass, and a
second-order inner step costs about ``6F`` per support row (forward, backward, and the backward of
the backward) plus ``3F`` per query row; first order drops the extra ``3F`` on support rows.
Against the machine: a 2048^3 fp32 matmul is timed in the same process, with the same threads,
so ``peak_fraction`` (vectorized GFLOP/s / matmul GFLOP/s) is a ratio measured side by side.
The table goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from gmeta.io.schema import Schema, SparseFeature, TableSpec
from gmeta.models.registry import build_model
from gmeta.trainer.config import defaults, part_configs
from gmeta.trainer.embedding.build import build_embedding
from gmeta.trainer.meta.learner import MetaLearner
from gmeta.trainer.parallel.comm import LocalCommunicator

#: the step this benchmark's FLOP count describes (kept fixed across releases, so its figures
#: compare): the whole MLP adapts by one gradient step, no plain loss, no item prior
FIXED_STEP = dict(adapt=("head",), inner_solver="gradient", plain_loss_weight=0.0, item_prior=False,
                  inner_lr=0.5, outer_lr=1e-3)


def add_arguments(p) -> None:
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--support", type=int, default=64)
    p.add_argument("--query", type=int, default=10)
    p.add_argument("--fields", type=int, default=7)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", default="64,64")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")


def _problem(args):
    import tensorflow as tf

    names = [f"f{i}" for i in range(args.fields)]
    schema = Schema(labels=("click",), sparse=tuple(SparseFeature(n, n) for n in names),
                    tables=tuple(TableSpec(n, 1000) for n in names)).validate()
    rng = np.random.default_rng(0)

    def part(n):
        out = {f: tf.constant(rng.integers(0, 1000, (args.tasks, n)), tf.int64) for f in names}
        out["click"] = tf.constant(rng.integers(0, 2, (args.tasks, n)), tf.float32)
        out["mask"] = tf.ones((args.tasks, n))
        return out

    batch = {"support": part(args.support), "query": part(args.query),
             "task_id": tf.range(args.tasks, dtype=tf.int64), "task_mask": tf.ones(args.tasks)}
    return schema, batch


def _time(schema, batch, args, task_loop: bool) -> float:
    import tensorflow as tf

    hidden = tuple(int(h) for h in args.hidden.split(","))
    train_cfg = defaults("maml_dnn", emb_dim=args.dim, hidden=hidden, emb_lr=0.05, first_order=args.first_order,
                         task_loop=task_loop, **FIXED_STEP)
    model_cfg, meta_cfg, row_cfg = part_configs(train_cfg)
    model = build_model("maml_dnn", schema, model_cfg)
    comm = LocalCommunicator()
    # the tables placed as gmeta train places them (these small ones whole: --replicate-tables)
    emb = build_embedding(model, comm, mode="hybrid", optimizer=row_cfg, seed=0,
                          replicate_under=train_cfg.replicate_under)
    learner = MetaLearner(model, emb, comm, meta_cfg)
    step = tf.function(learner.train_step, autograph=False)
    step(batch)  # trace
    step(batch)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(batch)
    return (time.perf_counter() - t0) / args.steps


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n^3 matmul in TensorFlow with this process's thread settings."""
    import tensorflow as tf

    a = tf.random.stateless_normal([n, n], seed=[1, 2])
    b = tf.random.stateless_normal([n, n], seed=[3, 4])
    mm = tf.function(lambda x, y: tf.reduce_sum(tf.linalg.matmul(x, y)))
    float(mm(a, b))  # trace and warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        float(mm(a, b))
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def main(args) -> int:
    schema, batch = _problem(args)
    hidden = [int(h) for h in args.hidden.split(",")]
    sizes = [args.fields * args.dim, *hidden, 1]
    f_row = 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    support_factor = 3 if args.first_order else 6
    flops = args.tasks * f_row * (support_factor * args.support + 3 * args.query)
    results = {}
    for name, loop in (("vectorized", False), ("task_loop", True)):
        sec = _time(schema, batch, args, loop)
        results[name] = {"ms_per_step": round(sec * 1e3, 2), "tasks_per_s": round(args.tasks / sec, 1),
                         "samples_per_s": round(args.tasks * (args.support + args.query) / sec),
                         "gflop_per_s": round(flops / sec / 1e9, 2)}
    peak = matmul_gflops()
    out = sys.stderr
    print(f"{'mode':<12}{'ms/step':>10}{'tasks/s':>10}{'samples/s':>12}{'GFLOP/s':>10}", file=out)
    for name, r in results.items():
        print(f"{name:<12}{r['ms_per_step']:>10}{r['tasks_per_s']:>10}{r['samples_per_s']:>12}{r['gflop_per_s']:>10}",
              file=out)
    results["speedup"] = round(results["task_loop"]["ms_per_step"] / results["vectorized"]["ms_per_step"], 2)
    results["flops_per_step"] = flops
    results["matmul_gflop_per_s"] = round(peak, 1)
    results["peak_fraction"] = round(results["vectorized"]["gflop_per_s"] / peak, 3)
    print(f"fp32 2048^3 matmul, same threads: {peak:.1f} GFLOP/s; the vectorized meta-step reaches "
          f"{results['peak_fraction']:.1%} of it", file=out)
    print(json.dumps(results, sort_keys=True))
    return 0
