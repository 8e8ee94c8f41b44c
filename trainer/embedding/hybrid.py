"""Model-parallel embeddings: tables row-sharded over ranks, looked up through AlltoAll; the
plan's small ``replicated`` tables held whole by every rank (a local gather; their gradients,
dense with a touch count, ride the step's one fused allreduce, like the naive baseline's).

One ``lookup`` call makes ONE round trip for all its tables (U = unique (table, row) pairs this
rank needs, R = pairs it serves to anyone):
  1. per table, unique rows of all features sharing it; every pair becomes one int64 key
     ``row * num_tables + table``; keys sorted by owner ``row % N``, splits = counts per owner
  2. AlltoAll of the keys (int64 [U]) -> R requested keys, ``kind="alltoall_ids"``
  3. local gathers from the shards at ``row // N``, packed into one flat float buffer
     (tables may differ in dim), split per requesting rank
  4. AlltoAll of the vectors back (``kind="alltoall_vectors"``), unpacked per table, expanded
Backward: the vector gradient travels the reverse AlltoAll (``alltoall_grads``) and reaches
the shards as IndexedSlices of local rows; for a row it holds the *sum* over ranks, which
``apply_reduced`` multiplies by the step's scale (gmeta.trainer.parallel.comm's rule) before the row-wise
optimizer touches only those rows. Owners and local rows come from the plan's placement rule.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gmeta.trainer.embedding.base import EmbeddingBase, dedupe_rows, pack_touched, unpack_touched


class HybridEmbedding(EmbeddingBase):
    """Row-sharded tables (row r on rank r % N at local row r // N)."""

    mode = "hybrid"

    def __init__(self, plan, comm, optimizer, seed=0, init_stddev=0.05, name="hybrid_embedding"):
        super().__init__(plan, comm, optimizer, seed, init_stddev, name)
        for table in plan.tables:
            self._add_table(table, self._make_shard(table))

    def _make_shard(self, table) -> tf.Variable:
        rows = self._plan.global_rows(table.name, self._comm.rank)
        return tf.Variable(self._initial(table, rows), trainable=True, name=f"{table.name}/shard")

    def _local_table(self, table):
        # replicated tables: a local gather (the base's); the rest share ONE AlltoAll round trip,
        # none when every requested table is replicated (the same static choice on every rank)
        return self.params[self.table_index(table.name)] if self._plan.is_replicated(table.name) else None

    def _lookup_tables(self, requests):
        return self._fetch_sharded(requests)

    def _fetch_sharded(self, requests):
        n = self._comm.size
        num_tables = len(self._plan.tables)
        keys, owners, uniques = [], [], []
        for table, rows in requests:
            uniq, inv = tf.unique(rows, out_idx=tf.int64)
            keys.append(uniq * num_tables + self.table_index(table.name))
            owners.append(self._plan.owner(uniq, table.name))
            uniques.append((uniq, inv))
        owner = tf.concat(owners, axis=0)
        order = tf.argsort(owner, stable=True)
        send = tf.gather(tf.concat(keys, axis=0), order)
        splits = tf.math.bincount(tf.cast(owner, tf.int32), minlength=n, maxlength=n,
                                  dtype=tf.int32)
        recv, recv_splits = self._comm.alltoall(send, splits, kind="alltoall_ids")
        served, served_splits = self._serve(requests, recv, recv_splits)
        back, _ = self._comm.alltoall(served, served_splits, kind="alltoall_vectors")
        # the key at sorted position j owns units send_offset[j] ... + its dim / unit of back;
        # every table's vectors come out of ONE gather (its gradient: one scatter of the buffer,
        # where a gather per table cost a scatter of the whole buffer per table)
        back = tf.reshape(back, [-1, self._unit])
        send_offset = tf.math.cumsum(self._units_of(send), exclusive=True)
        sorted_position = tf.cast(tf.math.invert_permutation(order), tf.int64)
        where = tf.gather(send_offset, sorted_position)            # [U] in request order
        index, sizes, start = [], [], 0
        for (table, _), (uniq, _) in zip(requests, uniques):
            size = tf.size(uniq, out_type=tf.int64)
            index.append(tf.reshape(_unit_index(where[start:start + size], table.dim // self._unit), [-1]))
            sizes.append(size * (table.dim // self._unit))
            start += size
        parts = tf.split(tf.gather(back, tf.concat(index, axis=0)), tf.stack(sizes), num=len(sizes))
        return [(tf.reshape(v, [-1, table.dim]), inv)
                for v, (table, _), (_, inv) in zip(parts, requests, uniques)]

    def _serve(self, requests, recv, recv_splits):
        """Vectors for the received keys as one flat buffer, and its split per requesting rank."""
        n = self._comm.size
        num_tables = len(self._plan.tables)
        table_of = tf.math.floormod(recv, num_tables)
        rows = tf.math.floordiv(recv, num_tables)
        units = self._units_of(recv)
        offset = tf.math.cumsum(units, exclusive=True)
        positions, values = [], []
        for table, _ in requests:
            i = self.table_index(table.name)
            sel = tf.where(tf.equal(table_of, i))[:, 0]
            local = self._plan.local_row(tf.gather(rows, sel), table.name)
            values.append(tf.reshape(tf.gather(self.params[i], local), [-1, self._unit]))
            positions.append(tf.reshape(_unit_index(tf.gather(offset, sel), table.dim // self._unit), [-1]))
        # one gather puts the units in the requesters' order (the inverse of where each goes)
        served = tf.gather(tf.concat(values, axis=0), tf.math.invert_permutation(
            tf.cast(tf.concat(positions, axis=0), tf.int32)))
        requester = tf.repeat(tf.range(n), recv_splits)
        served_splits = tf.math.unsorted_segment_sum(units * self._unit, requester, n)
        return tf.reshape(served, [-1]), tf.cast(served_splits, tf.int32)

    @property
    def _unit(self) -> int:
        """Vectors move in units of the tables' common divisor of dims (a whole vector when
        every table has the same dim), so index arithmetic is per unit, not per float."""
        return int(np.gcd.reduce([t.dim for t in self._plan.tables]))

    def _units_of(self, keys):
        """Units (of ``_unit`` floats) in the vector of each (row, table) key."""
        units = tf.constant([t.dim // self._unit for t in self._plan.tables], tf.int64)
        return tf.gather(units, tf.math.floormod(keys, len(self._plan.tables)))

    def reduction_inputs(self, grads) -> list:
        """Per replicated table, ``pack_touched`` of its gradient (every replicated table, looked
        up or not, so all ranks send the same)."""
        grads = self._check_grads(grads)
        return [pack_touched(g, table.num_rows, table.dim, var.dtype)
                for table, var, g in zip(self._plan.tables, self.params, grads)
                if self._plan.is_replicated(table.name)]

    def apply_reduced(self, grads, reduced, scale) -> None:
        """Row-wise update: of the owned rows with the gradients the AlltoAll brought home, and
        of a replicated table's rows any rank touched with the summed ``reduced`` ones."""
        grads = self._check_grads(grads)
        t = self.optimizer.next_step()
        summed = iter(reduced)
        for table, var, slots, g in zip(self._plan.tables, self.params, self.slots, grads):
            if self._plan.is_replicated(table.name):
                rows, values = unpack_touched(next(summed))
                self.optimizer.apply_rows(var, slots, rows, values * scale, t)
                continue
            if g is None:
                continue
            rows, values = dedupe_rows(g)
            self.optimizer.apply_rows(var, slots, rows, values * scale, t)

    def gather_full_table(self, name: str) -> np.ndarray:
        """Whole table as numpy on every rank (collective for a sharded table: every rank must
        call it)."""
        table = self._plan.table(name)
        shard = self.params[self.table_index(name)].numpy()
        if self._plan.is_replicated(name):
            return shard.copy()
        shards = self._comm.allgather_object(shard)
        full = np.empty((table.num_rows, table.dim), dtype=np.float32)
        for rank, part in enumerate(shards):
            full[self._plan.global_rows(name, rank)] = part
        return full

    def set_full_table(self, name: str, values) -> None:
        """Load a whole table; each rank keeps its own rows (optimizer state is untouched)."""
        values = self._check_full(name, values)
        self.params[self.table_index(name)].assign(values[self._plan.global_rows(name, self._comm.rank)])


def _unit_index(offsets, units: int):
    """``[K]`` start offsets -> ``[K, units]`` unit positions."""
    return offsets[:, None] + tf.range(units, dtype=tf.int64)[None, :]
