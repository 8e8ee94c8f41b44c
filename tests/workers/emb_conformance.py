"""Worker: every embedding backend vs a single-process reference on the same global batch.

For each mode and optimizer: the initial global table equals the world-size-free init; each of
three steps (rank-encoded ids, an empty rank, shared hot rows) must give forward vectors equal
to tf.nn.embedding_lookup on the full table, and tables after the step equal to plain TF +
numpy on the full table and full global batch. Counters of one step are compared with the
analytic count. Writes rank{r}.json. With --bad-id the last rank passes an out-of-range id.
"""
import argparse
import json
import os
import sys

import emb_reference as ref
import numpy as np
import tensorflow as tf

from gmeta.trainer.embedding.factory import RowOptimizerConfig, make_embedding
from gmeta.trainer.embedding.initial import initial_rows
from gmeta.trainer.embedding.plan import ShardingPlan
from gmeta.trainer.parallel.comm import init_communicator
from gmeta.trainer.parallel.launch import run_guarded

SPEC = {"item_id": tf.TensorSpec([None], tf.int64),
        "hist_items": tf.TensorSpec([None, ref.HIST], tf.int64),
        "user_id": tf.TensorSpec([None], tf.int64),
        "tiny_id": tf.TensorSpec([None], tf.int64)}
OPTIMIZERS = {"sgd": RowOptimizerConfig("sgd", 0.1),
              "adagrad": RowOptimizerConfig("adagrad", 0.1),
              "adam": RowOptimizerConfig("adam", 0.05, epsilon=1e-6)}


# tiered modes: these rows replicated on every rank (case 2 hammers items 0-3; rank 0's case-0
# items are multiples of the world size, so some are hot and some cold)
HOT_ROWS = {"item": [0, 1, 2, 3, 10, 21, 49], "user": [0, 5], "tiny": [1]}


#: the ``mixed`` mode: hybrid with these tables replicated whole (the item table stays sharded)
REPLICATED = ("tiny", "user")


def build(mode, plan, comm, cfg):
    """A backend by name; ``tiered-sparse`` / ``tiered-dense`` are hybrid plus HOT_ROWS, ``mixed``
    is hybrid with the REPLICATED tables held whole by every rank."""
    if mode == "mixed":
        plan = ShardingPlan.build(plan.tables, dict(plan.feature_tables), plan.world_size, REPLICATED)
        return make_embedding("hybrid", plan=plan, comm=comm, optimizer=cfg, seed=0, init_stddev=0.05)
    if mode.startswith("tiered-"):
        return make_embedding("hybrid", plan=plan, comm=comm, optimizer=cfg, seed=0, init_stddev=0.05,
                              hot_rows=HOT_ROWS, hot_sync=mode.split("-", 1)[1])
    return make_embedding(mode, plan=plan, comm=comm, optimizer=cfg, seed=0, init_stddev=0.05)


def make_step(emb):
    @tf.function(input_signature=[SPEC], autograph=False)
    def step(ids):
        with tf.GradientTape() as tape:
            vecs = emb.lookup(ids)
            loss = ref.local_loss(vecs, tf.shape(ids["item_id"])[0])
        # each rank's loss is its share of a mean over ranks: scale the sum over ranks by 1/N
        emb.apply_gradients(tape.gradient(loss, emb.trainable_variables), scale=1.0 / emb.comm.size)
        return vecs
    return step


def max_err(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in a)


def run_mode(mode, comm, plan, initial, optimizers=None):
    """Run the three steps for each optimizer; returns (results per optimizer, final tables)."""
    r, n = comm.rank, comm.size
    out = {}
    finals = {}
    for kind, cfg in (optimizers or OPTIMIZERS).items():
        emb = build(mode, plan, comm, cfg)
        res = {"init_err": max_err({t: emb.gather_full_table(t) for t in initial}, initial)}
        tables = {k: v.copy() for k, v in initial.items()}
        reference = ref.ReferenceOptimizer(cfg, tables)
        step = make_step(emb)
        if kind == "sgd":  # eager path once (no tf.function), same checks on the forward
            eager = {k: v.numpy() for k, v in emb.lookup(ref.batch(0, r, n)).items()}
            res["eager_fwd_err"] = max_err(eager, ref.reference_lookup(tables, ref.batch(0, r, n)))
        res["fwd_err"], res["table_err"], res["untouched_moved"] = [], [], []
        prev = {k: v.copy() for k, v in initial.items()}
        for case in range(ref.NUM_CASES):
            batches = ref.global_batches(case, n)
            before = comm.counters.snapshot()
            vecs = step({k: tf.constant(v) for k, v in batches[r].items()})
            delta = comm.counters.delta(before)
            if case == 0:
                res["counters"] = delta
                res["analytic"] = ref.analytic_counters(batches, r, n)
            # forward vs tf.nn.embedding_lookup on this backend's own full table (bit-exact)
            res["fwd_err"].append(max_err({k: v.numpy() for k, v in vecs.items()},
                                          ref.reference_lookup(prev, batches[r])))
            grads, touched = ref.reference_grads(tables, batches)
            reference.step(tables, grads, touched)
            got = {t: emb.gather_full_table(t) for t in tables}
            res["table_err"].append(max_err(got, tables))
            # rows no rank looked up must keep their exact previous value (lazy update)
            res["untouched_moved"].append(max(
                float(np.max(np.abs(np.delete(got[t] - prev[t], touched[t], axis=0)), initial=0.0))
                for t in got))
            prev = got
        res["moved"] = max_err({t: emb.gather_full_table(t) for t in initial}, initial)
        if mode.startswith("tiered-"):  # a checkpoint-style reload refreshes the replicas
            saved = {n: v.numpy() for n, v in emb.state_variables().items()}
            for v in emb.hot_params:
                v.assign(tf.zeros_like(v))
            for name, var in emb.state_variables().items():
                var.assign(saved[name])
            emb.after_load()
            res["reload_err"] = max_err({t: emb.gather_full_table(t) for t in initial}, prev)
            res["reload_fwd_err"] = max_err({k: v.numpy() for k, v in emb.lookup(ref.batch(2, r, n)).items()},
                                            ref.reference_lookup(prev, ref.batch(2, r, n)))
        finals[kind] = {t: emb.gather_full_table(t) for t in initial}
        out[kind] = res
    return out, finals


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--modes", default="hybrid,naive")
    parser.add_argument("--bad-id", action="store_true")
    args = parser.parse_args()
    comm = init_communicator("horovod")
    r, n = comm.rank, comm.size
    plan = ref.plan_for(n)
    if args.bad_id:
        emb = make_embedding("hybrid", plan=plan, comm=comm, optimizer=RowOptimizerConfig("adagrad", 0.01))
        emb.lookup({"item_id": np.array([1, 2, 50 if r == n - 1 else 3], np.int64)})
        comm.barrier()
        return 0
    initial = {t.name: initial_rows(0, t.name, np.arange(t.num_rows), t.dim, 0.05)
               for t in ref.TABLES}
    result = {"rank": r, "size": n, "modes": {}}
    finals = {}
    for mode in args.modes.split(","):
        result["modes"][mode], finals[mode] = run_mode(mode, comm, plan, initial)
    modes = list(finals)
    result["cross_mode_err"] = {
        f"{a}-{b}": max(max_err(finals[a][k], finals[b][k]) for k in OPTIMIZERS)
        for i, a in enumerate(modes) for b in modes[i + 1:]}
    with open(os.path.join(args.out_dir, f"rank{r}.json"), "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
