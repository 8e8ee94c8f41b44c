"""The replicated baseline (DMAML style): every rank holds every full table.

Lookup is a local gather. ``reduction_inputs`` turns each table's gradient into a dense
``[num_rows, dim + 1]`` tensor: the gradient and a "row touched" count (``pack_touched``); the meta-step sums them
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

from gmeta.trainer.embedding.base import EmbeddingBase, pack_touched, unpack_touched


class NaiveEmbedding(EmbeddingBase):
    """Full tables replicated on every rank; dense all-reduce of table gradients."""

    mode = "naive"

    def __init__(self, plan, comm, optimizer, seed=0, init_stddev=0.05, name="naive_embedding"):
        super().__init__(plan, comm, optimizer, seed, init_stddev, name)
        for table in plan.tables:
            init = self._initial(table, np.arange(table.num_rows, dtype=np.int64))
            self._add_table(table, tf.Variable(init, trainable=True, name=f"{table.name}/full"))

    def _local_table(self, table):
        # every table is whole here: the base gathers them all, no request reaches _lookup_tables
        return self.params[self.table_index(table.name)]

    def reduction_inputs(self, grads) -> list:
        """Every table's ``pack_touched`` gradient (a dense table and a row-touched count)."""
        grads = self._check_grads(grads)
        return [pack_touched(g, table.num_rows, table.dim, var.dtype)
                for table, var, g in zip(self._plan.tables, self.params, grads)]

    def apply_reduced(self, grads, reduced, scale) -> None:
        """Row-wise update of the rows any rank touched, with the summed gradients x ``scale``."""
        t = self.optimizer.next_step()
        for var, slots, summed in zip(self.params, self.slots, reduced):
            rows, values = unpack_touched(summed)
            self.optimizer.apply_rows(var, slots, rows, values * scale, t)

    def gather_full_table(self, name: str) -> np.ndarray:
        """Whole table as numpy (local: every rank already has it; no collective)."""
        return self.params[self.table_index(name)].numpy().copy()

    def set_full_table(self, name: str, values) -> None:
        self.params[self.table_index(name)].assign(self._check_full(name, values))

    def state_rows(self, name: str) -> np.ndarray:
        """Every row: each rank holds the whole table."""
        return np.arange(self._plan.table(name).num_rows, dtype=np.int64)
