"""Tiered embeddings (FAE's idea on the hybrid placement): hot rows replicated, the tail sharded.

A table keeps its full row-sharded storage (the plan's one placement rule, so checkpoints and
exports see the same table as without tiering) and, in addition, a replica of its hot rows on
every rank (``hot_rows``: sorted global rows, identical on every rank, chosen by
``gmeta.trainer.embedding.tiering.choose_hot``). One lookup:
  1. per table, unique rows split into hot (found in the sorted hot rows) and cold;
  2. cold rows take the hybrid AlltoAll round trip, hot rows are gathered from the local replica;
  3. both are stitched back in unique-row order, so the model sees exactly the hybrid values.
The hot replicas' gradients are summed over ranks by one of two syncs, fixed per run:
  * ``sparse``: ONE allgather of (table, position, gradient) of the hot rows each rank touched
    (all tables packed together), summed in rank order;
  * ``dense``: the hot table's gradient and a touch count ride the step's one fused allreduce.
Every rank then applies the same row-wise update to the rows any rank touched, so replicas stay
identical and step exactly like the sharded rows would. The sharded copy of a hot row is stale
while training; ``state_variables`` and ``gather_full_table`` first write each rank's own hot
rows back (a local copy, since replicas are identical), and ``after_load`` refreshes the
replicas from the shards after a checkpoint is loaded (a collective).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gmeta.trainer.embedding.base import dedupe_rows, pack_touched, unpack_touched
from gmeta.trainer.embedding.hybrid import HybridEmbedding

SYNCS = ("sparse", "dense")


class TieredEmbedding(HybridEmbedding):
    """Hybrid sharding plus replicated hot rows (see module docstring)."""

    mode = "tiered"

    def __init__(self, plan, comm, optimizer, hot_rows: dict, sync: str = "sparse", seed=0,
                 init_stddev=0.05, name="tiered_embedding"):
        if sync not in SYNCS:
            raise ValueError(f"--hot-sync must be one of {SYNCS}, got {sync!r}")
        if plan.replicated:
            raise ValueError(f"tiering replicates the hot rows of sharded tables; the plan replicates whole tables "
                             f"{list(plan.replicated)} (build it with replicate_under=0)")
        super().__init__(plan, comm, optimizer, seed, init_stddev, name)
        self.sync = sync
        self.hot_rows = []      # numpy, plan order
        self.hot_params = []
        self.hot_slots = []
        for table in plan.tables:
            rows = np.unique(np.asarray(hot_rows.get(table.name, []), np.int64))
            if rows.size and (rows[0] < 0 or rows[-1] >= table.num_rows):
                raise ValueError(f"hot rows of table {table.name} must lie in [0, {table.num_rows})")
            if rows.size >= 2 ** 31:
                raise ValueError(f"table {table.name}: at most 2**31 - 1 hot rows")
            var = tf.Variable(self._initial(table, rows).reshape(rows.size, table.dim), trainable=True,
                              name=f"{table.name}/hot")
            self.hot_rows.append(rows)
            self.hot_params.append(var)
            self.hot_slots.append(self.optimizer.create_slots(var, f"{table.name}/hot"))
        self._hot_const = [tf.constant(r, tf.int64) for r in self.hot_rows]
        self._flushed_at = -1  # optimizer step at which the shards last got the replicas' values

    @property
    def trainable_variables(self):
        """Shards in plan order, then the hot replicas in plan order."""
        return tuple(self.params) + tuple(self.hot_params)

    def hot_bytes(self) -> int:
        """Bytes of the hot replicas and their slots on this rank."""
        return sum(int(np.prod(v.shape)) * v.dtype.size
                   for var, slots in zip(self.hot_params, self.hot_slots) for v in [var, *slots.values()])

    def memory_bytes(self) -> int:
        return super().memory_bytes() + self.hot_bytes()

    # ---- forward ----
    def _lookup_tables(self, requests):
        cold_requests, parts = [], []
        for table, rows in requests:
            i = self.table_index(table.name)
            uniq, inv = tf.unique(rows, out_idx=tf.int64)
            hot = self._hot_const[i]
            h = int(self.hot_rows[i].size)
            if h:
                pos = tf.minimum(tf.searchsorted(hot, uniq, side="left", out_type=tf.int64), h - 1)
                is_hot = tf.equal(tf.gather(hot, pos), uniq)
            else:
                pos, is_hot = tf.zeros_like(uniq), tf.zeros_like(uniq, dtype=tf.bool)
            hot_idx = tf.where(is_hot)[:, 0]
            cold_idx = tf.where(tf.logical_not(is_hot))[:, 0]
            cold_requests.append((table, tf.gather(uniq, cold_idx)))
            parts.append((i, inv, hot_idx, cold_idx, tf.gather(pos, hot_idx)))
        fetched = super()._lookup_tables(cold_requests)
        out = []
        for (i, inv, hot_idx, cold_idx, hot_pos), (cold_vectors, cold_src) in zip(parts, fetched):
            cold = tf.gather(cold_vectors, cold_src)
            hot = tf.gather(self.hot_params[i], hot_pos)
            vectors = tf.dynamic_stitch([tf.cast(cold_idx, tf.int32), tf.cast(hot_idx, tf.int32)], [cold, hot])
            out.append((vectors, inv))
        return out

    # ---- backward ----
    def _split_grads(self, grads):
        grads = list(grads)
        n = len(self.params)
        if len(grads) != 2 * n:
            raise ValueError(f"apply_gradients got {len(grads)} gradients for {2 * n} embedding "
                             f"variables (pass the result of tape.gradient(loss, emb.trainable_variables))")
        return grads[:n], grads[n:]

    def reduction_inputs(self, grads) -> list:
        """Dense sync: per table with hot rows, ``[h, dim + 1]`` (gradient sum, touch count) for
        the step's fused allreduce. Sparse sync: none (it has its own allgather)."""
        if self.sync != "dense":
            return []
        _, hot_grads = self._split_grads(grads)
        return [pack_touched(g, int(rows.size), int(var.shape[1]), var.dtype)
                for rows, var, g in zip(self.hot_rows, self.hot_params, hot_grads) if rows.size]

    def apply_reduced(self, grads, reduced, scale) -> None:
        shard_grads, hot_grads = self._split_grads(grads)
        t = self.optimizer.next_step()
        for var, slots, g in zip(self.params, self.slots, shard_grads):
            if g is not None:
                rows, values = dedupe_rows(g)
                self.optimizer.apply_rows(var, slots, rows, values * scale, t)
        updates = self._dense_sums(reduced) if self.sync == "dense" else self._sparse_sums(hot_grads)
        for i, (rows, values) in updates.items():
            self.optimizer.apply_rows(self.hot_params[i], self.hot_slots[i], rows, values * scale, t)

    def _dense_sums(self, reduced) -> dict:
        """{table index: (rows any rank touched, summed gradients)} from the fused allreduce."""
        out, k = {}, 0
        for i, rows in enumerate(self.hot_rows):
            if not rows.size:
                continue
            out[i] = unpack_touched(reduced[k])
            k += 1
        return out

    def _sparse_sums(self, hot_grads) -> dict:
        """ONE allgather of every rank's touched hot rows of every table: columns are (table,
        position) bit-cast into float32, then the gradient (zero-padded to the widest table);
        each table's rows are then summed in rank order."""
        width = max((int(v.shape[1]) for r, v in zip(self.hot_rows, self.hot_params) if r.size), default=0)
        packed = []
        for i, (rows, var, g) in enumerate(zip(self.hot_rows, self.hot_params, hot_grads)):
            if not rows.size:
                continue
            dim = int(var.shape[1])
            if g is None:
                pos, values = tf.zeros([0], tf.int64), tf.zeros([0, dim], var.dtype)
            else:
                pos, values = dedupe_rows(g)
            key = tf.fill(tf.shape(pos), tf.constant(i, tf.int32))
            cols = tf.stack([tf.bitcast(key, tf.float32), tf.bitcast(tf.cast(pos, tf.int32), tf.float32)], axis=1)
            packed.append(tf.concat([cols, tf.pad(values, [[0, 0], [0, width - dim]])], axis=1))
        if not packed:
            return {}
        gathered = self._comm.allgather(tf.concat(packed, axis=0), kind="hot_sync")
        table = tf.bitcast(gathered[:, 0], tf.int32)
        pos = tf.cast(tf.bitcast(gathered[:, 1], tf.int32), tf.int64)
        out = {}
        for i, (rows, var) in enumerate(zip(self.hot_rows, self.hot_params)):
            if not rows.size:
                continue
            sel = tf.where(tf.equal(table, i))[:, 0]
            uniq, idx = tf.unique(tf.gather(pos, sel), out_idx=tf.int64)
            values = tf.gather(gathered[:, 2:2 + int(var.shape[1])], sel)
            out[i] = (uniq, tf.math.unsorted_segment_sum(values, idx, tf.size(uniq, out_type=tf.int64)))
        return out

    def apply_gradients(self, grads, scale=1.0) -> None:
        inputs = self.reduction_inputs(grads)
        self.apply_reduced(grads, self._comm.allreduce_sum(inputs) if inputs else [], scale)

    # ---- one table for checkpoints and export ----
    def _owned_hot(self, i: int):
        """(positions in the replica, local rows in this rank's shard) of the hot rows it owns."""
        rows = self.hot_rows[i]
        own = np.flatnonzero(np.asarray(self._plan.owner(rows)) == self._comm.rank)
        return own, np.asarray(self._plan.local_row(rows[own]), np.int64)

    def flush_hot(self) -> None:
        """Write the replicas of the hot rows this rank owns (values and slots) into its shard,
        once per optimizer step: values assigned to the shards since (a load) are not undone."""
        step = int(self.optimizer.iterations.numpy())
        if step == self._flushed_at:
            return
        self._flushed_at = step
        for i in range(len(self.params)):
            own, local = self._owned_hot(i)
            if not own.size:
                continue
            pairs = [(self.params[i], self.hot_params[i])] + \
                [(self.slots[i][k], self.hot_slots[i][k]) for k in self.slots[i]]
            for shard, replica in pairs:
                shard.scatter_nd_update(local[:, None], tf.gather(replica, own))

    def after_load(self) -> None:
        """Refresh every replica from the shards' owners (collective: all ranks call it)."""
        mine = []
        for i in range(len(self.params)):
            own, local = self._owned_hot(i)
            vars_ = [self.params[i]] + [self.slots[i][k] for k in sorted(self.slots[i])]
            mine.append((own, [tf.gather(v, local).numpy() for v in vars_]))
        everyone = self._comm.allgather_object(mine)
        for i in range(len(self.params)):
            replicas = [self.hot_params[i]] + [self.hot_slots[i][k] for k in sorted(self.hot_slots[i])]
            for j, replica in enumerate(replicas):
                value = replica.numpy()
                for rank_part in everyone:
                    own, arrays = rank_part[i]
                    value[own] = arrays[j]
                replica.assign(value)
        self._flushed_at = int(self.optimizer.iterations.numpy())

    def state_variables(self) -> dict:
        self.flush_hot()
        return super().state_variables()

    def gather_full_table(self, name: str) -> np.ndarray:
        self.flush_hot()
        return super().gather_full_table(name)

    def set_full_table(self, name: str, values) -> None:
        super().set_full_table(name, values)
        i = self.table_index(name)
        self.hot_params[i].assign(self._check_full(name, values)[self.hot_rows[i]])
        self._flushed_at = int(self.optimizer.iterations.numpy())
