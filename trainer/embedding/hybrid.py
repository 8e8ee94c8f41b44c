"""Model-parallel embeddings: every table row-sharded over ranks, looked up through AlltoAll.

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

from gmeta.trainer.embedding.base import EmbeddingBase, dedupe_rows


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

    def _lookup_tables(self, requests):
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
        back = tf.reshape(back, [-1])
        # the key at sorted position j owns back[send_offset[j] : send_offset[j] + dim]
        send_offset = tf.math.cumsum(self._dims_of(send), exclusive=True)
        sorted_position = tf.cast(tf.math.invert_permutation(order), tf.int64)
        out = []
        start = tf.constant(0, tf.int64)
        for (table, _), (uniq, inv) in zip(requests, uniques):
            size = tf.size(uniq, out_type=tf.int64)
            where = tf.gather(send_offset, sorted_position[start:start + size])
            vectors = tf.gather_nd(back, _element_index(where, table.dim)[..., None])
            out.append((tf.reshape(vectors, [-1, table.dim]), inv))
            start += size
        return out

    def _serve(self, requests, recv, recv_splits):
        """Vectors for the received keys as one flat buffer, and its split per requesting rank."""
        n = self._comm.size
        num_tables = len(self._plan.tables)
        table_of = tf.math.floormod(recv, num_tables)
        rows = tf.math.floordiv(recv, num_tables)
        dims = self._dims_of(recv)
        offset = tf.math.cumsum(dims, exclusive=True)
        positions, values = [], []
        for table, _ in requests:
            i = self.table_index(table.name)
            sel = tf.where(tf.equal(table_of, i))[:, 0]
            local = self._plan.local_row(tf.gather(rows, sel), table.name)
            values.append(tf.reshape(tf.gather(self.params[i], local), [-1]))
            positions.append(tf.cast(tf.reshape(
                _element_index(tf.gather(offset, sel), table.dim), [-1]), tf.int32))
        served = tf.dynamic_stitch(positions, values)
        requester = tf.repeat(tf.range(n), recv_splits)
        served_splits = tf.math.unsorted_segment_sum(dims, requester, n)
        return served, tf.cast(served_splits, tf.int32)

    def _dims_of(self, keys):
        """Vector length of each (row, table) key."""
        dims = tf.constant([t.dim for t in self._plan.tables], tf.int64)
        return tf.gather(dims, tf.math.floormod(keys, len(self._plan.tables)))

    def apply_reduced(self, grads, reduced, scale) -> None:
        """Row-wise update of the owned rows; no collective (the gradients already came home)."""
        grads = self._check_grads(grads)
        t = self.optimizer.next_step()
        for var, slots, g in zip(self.params, self.slots, grads):
            if g is None:
                continue
            rows, values = dedupe_rows(g)
            self.optimizer.apply_rows(var, slots, rows, values * scale, t)

    def gather_full_table(self, name: str) -> np.ndarray:
        """Whole table as numpy on every rank (collective: every rank must call it)."""
        table = self._plan.table(name)
        shard = self.params[self.table_index(name)].numpy()
        shards = self._comm.allgather_object(shard)
        full = np.empty((table.num_rows, table.dim), dtype=np.float32)
        for rank, part in enumerate(shards):
            full[self._plan.global_rows(name, rank)] = part
        return full

    def set_full_table(self, name: str, values) -> None:
        """Load a whole table; each rank keeps its own rows (optimizer state is untouched)."""
        values = self._check_full(name, values)
        self.params[self.table_index(name)].assign(values[self._plan.global_rows(name, self._comm.rank)])


def _element_index(offsets, dim: int):
    """``[K]`` start offsets -> ``[K, dim]`` flat element positions."""
    return offsets[:, None] + tf.range(dim, dtype=tf.int64)[None, :]
