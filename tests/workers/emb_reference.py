"""Plain single-process references for the embedding tests: the scenario, the loss, and the
optimizers written out in numpy on the FULL table with the FULL global batch.

Shared by tests/test_embedding.py (imported) and the horovodrun workers (same folder).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gmeta.trainer.embedding.plan import ShardingPlan, TableConfig

TABLES = [TableConfig("item", 50, 4), TableConfig("user", 7, 3, hashed=True),
          TableConfig("tiny", 2, 2)]
FEATURES = {"item_id": "item", "hist_items": "item", "user_id": "user", "tiny_id": "tiny"}
HIST = 3
NUM_CASES = 3


def plan_for(world_size: int) -> ShardingPlan:
    return ShardingPlan.build(TABLES, FEATURES, world_size)


def batch(case: int, rank: int, world: int) -> dict:
    """Rank ``rank``'s ids for step ``case``; every rank can build every rank's batch.

    case 0: rank-encoded ids; rank 0 only asks owner 0 for items (no ids for other owners);
            duplicates everywhere, -1 padding, huge hashed user ids, negative user ids.
    case 1: very uneven sizes; the last rank has an EMPTY batch (the only rank when world=1).
    case 2: every rank hammers the same few hot rows (cross-rank gradient accumulation).
    """
    rng = np.random.default_rng(1000 * case + rank)
    if case == 0:
        b = 5 + 3 * rank
        if rank == 0:
            item = world * rng.integers(0, 50 // world, b)
        else:
            item = (rng.integers(0, 50 // world, b) * world + rank) % 50
            item[::2] = item[0]  # duplicates within the rank
    elif case == 1:
        b = 0 if rank == world - 1 else (60 if rank == 0 else 2)
        item = rng.integers(0, 50, b)
    else:
        b = 6
        item = rng.integers(0, 4, b)
    hist = rng.integers(0, 50, (b, HIST))
    tiny = rng.integers(0, 2, b)
    if case == 0 and rank == 0:  # rank 0 asks only owner 0 for item and tiny rows
        hist = world * rng.integers(0, 50 // world, (b, HIST))
        tiny = np.zeros(b, np.int64)
    hist[rng.random((b, HIST)) < 0.4] = -1
    user = 10 ** 12 + rng.integers(0, 10 ** 6, b) * 7919 + rank
    user[rng.random(b) < 0.25] = -5
    return {"item_id": item.astype(np.int64), "hist_items": hist.astype(np.int64),
            "user_id": user.astype(np.int64), "tiny_id": tiny.astype(np.int64)}


def global_batches(case: int, world: int) -> list:
    return [batch(case, r, world) for r in range(world)]


_WEIGHTS = {f: np.linspace(-1.0, 1.0, plan_for(1).table_of(f).dim).astype(np.float32) + 0.1 * i
            for i, f in enumerate(sorted(FEATURES))}


def local_loss(vectors: dict, num_samples) -> tf.Tensor:
    """A rank's mean loss over its samples (0 for an empty batch); nonlinear in the vectors."""
    total = tf.constant(0.0)
    for f in sorted(vectors):
        s = tf.reduce_sum(vectors[f] * _WEIGHTS[f], axis=-1)
        total += tf.reduce_sum(tf.sin(3.0 * s) + 0.5 * tf.square(s))
    return total / tf.maximum(tf.cast(num_samples, tf.float32), 1.0)


def clean_rows(ids: np.ndarray, table: TableConfig) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    return np.where(ids >= 0, ids % table.num_rows if table.hashed else ids, -1)


def reference_lookup(full: dict, ids: dict) -> dict:
    """Plain tf.nn.embedding_lookup on the unsharded tables, zeros for ids < 0."""
    out = {}
    plan = plan_for(1)
    for f, v in ids.items():
        table = plan.table_of(f)
        rows = clean_rows(v, table)
        vec = tf.nn.embedding_lookup(tf.constant(full[table.name]), np.maximum(rows, 0))
        out[f] = (vec * (rows >= 0)[..., None].astype(np.float32)).numpy()
    return out


def reference_grads(full: dict, batches: list) -> tuple:
    """Gradient of the global mean loss (mean over ranks of local losses) on the full tables,
    and the rows each table's lookups touched (union over ranks)."""
    plan = plan_for(1)
    variables = {t.name: tf.Variable(full[t.name]) for t in TABLES}
    touched = {t.name: set() for t in TABLES}
    with tf.GradientTape() as tape:
        losses = []
        for b in batches:
            vecs = {}
            for f, v in b.items():
                table = plan.table_of(f)
                rows = clean_rows(v, table)
                touched[table.name].update(rows[rows >= 0].tolist())
                mask = tf.constant((rows >= 0)[..., None].astype(np.float32))
                vecs[f] = tf.gather(variables[table.name], np.maximum(rows, 0)) * mask
            losses.append(local_loss(vecs, len(b["item_id"])))
        loss = tf.add_n(losses) / float(len(batches))
    grads = tape.gradient(loss, [variables[t.name] for t in TABLES])
    dense = {t.name: tf.convert_to_tensor(g).numpy() for t, g in zip(TABLES, grads)}
    return dense, {k: np.array(sorted(v), dtype=np.int64) for k, v in touched.items()}


class ReferenceOptimizer:
    """numpy sgd / adagrad / lazy adam on full tables (formulas of gmeta.trainer.embedding.row_optim)."""

    def __init__(self, config, tables: dict):
        self.c = config
        self.t = 0
        self.acc = {k: np.full_like(v, config.initial_accumulator) for k, v in tables.items()}
        self.m = {k: np.zeros_like(v) for k, v in tables.items()}
        self.v = {k: np.zeros_like(v) for k, v in tables.items()}

    def step(self, tables: dict, grads: dict, touched: dict) -> None:
        self.t += 1
        c = self.c
        for name, w in tables.items():
            rows = touched[name]
            g = grads[name][rows].astype(np.float64)
            if c.kind == "sgd":
                w[rows] -= (c.learning_rate * g).astype(np.float32)
            elif c.kind == "adagrad":
                a = self.acc[name][rows] + g * g
                self.acc[name][rows] = a
                w[rows] -= (c.learning_rate * g / (np.sqrt(a) + c.epsilon)).astype(np.float32)
            else:
                m = c.beta1 * self.m[name][rows] + (1 - c.beta1) * g
                v = c.beta2 * self.v[name][rows] + (1 - c.beta2) * g * g
                self.m[name][rows], self.v[name][rows] = m, v
                lr_t = c.learning_rate * np.sqrt(1 - c.beta2 ** self.t) / (1 - c.beta1 ** self.t)
                w[rows] -= (lr_t * m / (np.sqrt(v) + c.epsilon)).astype(np.float32)


def analytic_counters(batches: list, rank: int, world: int) -> dict:
    """Bytes one hybrid lookup+backward must move on ``rank`` for these global batches.

    ids: 8 bytes per unique valid row this rank needs; vectors: 4*dim per row it serves to
    anyone (requests from all ranks); grads: 4*dim per row it needs (vectors it received).
    """
    plan = plan_for(world)
    out = {"alltoall_ids": 0, "alltoall_vectors": 0, "alltoall_grads": 0}
    for t in TABLES:
        feats = plan.features_of(t.name)
        uniq = []
        for b in batches:
            rows = np.concatenate([clean_rows(b[f], t).reshape(-1) for f in feats])
            uniq.append(np.unique(rows[rows >= 0]))
        served = sum(int(np.sum(u % world == rank)) for u in uniq)
        out["alltoall_ids"] += 8 * uniq[rank].size
        out["alltoall_vectors"] += 4 * t.dim * served
        out["alltoall_grads"] += 4 * t.dim * uniq[rank].size
    return out


def assert_conformance(result: dict, label: str, tol: float = 1e-6) -> None:
    """Checks on one mode's per-optimizer results written by emb_conformance.run_mode."""
    assert result, f"{label}: no results"
    for kind, res in result.items():
        where = f"{label}/{kind}"
        assert res["init_err"] == 0.0, f"{where}: initial table differs from the global init"
        assert res.get("eager_fwd_err", 0.0) == 0.0, f"{where}: eager lookup differs"
        assert res["fwd_err"] == [0.0] * NUM_CASES, f"{where}: lookups differ {res['fwd_err']}"
        assert max(res["table_err"]) <= tol, f"{where}: tables after steps {res['table_err']}"
        assert res["untouched_moved"] == [0.0] * NUM_CASES, \
            f"{where}: rows nobody looked up changed {res['untouched_moved']}"
        assert res["moved"] > 1e-3, f"{where}: the optimizer did not move the tables"
