"""The replicated baseline (DMAML style): every rank holds every full table.

Lookup is a local gather. ``reduction_inputs`` turns each table's gradient into a dense
``[num_rows, dim]`` tensor plus a ``[num_rows]`` "row touched" count; the meta-step sums them
over ranks in its ONE fused all-reduce, together with the dense meta-gradients (counted as
``allreduce`` bytes: the full tables, which is the traffic the hybrid design avoids), so the
baseline is the strongest version of itself. The summed gradient equals what the hybrid path's
rows receive through AlltoAll, and both are scaled by the same rule (gmeta.trainer.parallel.comm); the
touched mask makes the lazy optimizers update exactly the rows some rank looked up, so both
modes give the same numbers.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gmeta.trainer.embedding.base import EmbeddingBase


class NaiveEmbedding(EmbeddingBase):
    """Full tables replicated on every rank; dense all-reduce of table gradients."""

    mode = "naive"

    def __init__(self, plan, comm, optimizer, seed=0, init_stddev=0.05, name="naive_embedding"):
        super().__init__(plan, comm, optimizer, seed, init_stddev, name)
        for table in plan.tables:
            init = self._initial(table, np.arange(table.num_rows, dtype=np.int64))
            self._add_table(table, tf.Variable(init, trainable=True, name=f"{table.name}/full"))

    def _lookup_tables(self, requests):
        return [(tf.gather(self.params[self.table_index(t.name)], rows),
                 tf.range(tf.size(rows, out_type=tf.int64))) for t, rows in requests]

    def reduction_inputs(self, grads) -> list:
        """Every table's gradient as a dense table, then every table's row-touched count."""
        grads = self._check_grads(grads)
        dense, touched = [], []
        # every table takes part even without a gradient, so all ranks send the same tensors
        for table, var, g in zip(self._plan.tables, self.params, grads):
            n = table.num_rows
            if g is None:
                dense.append(tf.zeros_like(var))
                touched.append(tf.zeros([n], var.dtype))
            elif isinstance(g, tf.IndexedSlices):
                idx = tf.cast(g.indices, tf.int64)
                dense.append(tf.math.unsorted_segment_sum(g.values, idx, n))
                touched.append(tf.math.unsorted_segment_sum(tf.ones_like(idx, var.dtype), idx, n))
            else:
                dense.append(tf.convert_to_tensor(g))
                touched.append(tf.ones([n], var.dtype))
        return dense + touched

    def apply_reduced(self, grads, reduced, scale) -> None:
        """Row-wise update of the rows any rank touched, with the summed gradients x ``scale``."""
        t = self.optimizer.next_step()
        k = len(self.params)
        for var, slots, g, seen in zip(self.params, self.slots, reduced[:k], reduced[k:]):
            rows = tf.where(seen > 0)[:, 0]
            self.optimizer.apply_rows(var, slots, rows, tf.gather(g, rows) * scale, t)

    def gather_full_table(self, name: str) -> np.ndarray:
        """Whole table as numpy (local: every rank already has it; no collective)."""
        return self.params[self.table_index(name)].numpy().copy()

    def set_full_table(self, name: str, values) -> None:
        self.params[self.table_index(name)].assign(self._check_full(name, values))

    def state_rows(self, name: str) -> np.ndarray:
        """Every row: each rank holds the whole table."""
        return np.arange(self._plan.table(name).num_rows, dtype=np.int64)
