"""SparseOperationKit (merlin-sok) backend for GPU hosts, behind the same embedding interface.

SOK's ``mode="distributed"`` variable uses the same placement as the CPU path (row r on rank
r % N at local row r // N), so initial values, ``gather_full_table``, ``set_full_table`` and
the row-wise optimizer are shared with the hybrid backend. Only the lookup differs: it is
``sok.lookup_sparse`` (GPU kernels; keys exchanged with an all-gather, vectors with an
AlltoAll, both issued by SOK through Horovod, not through our communicator). Each id is its own
bag of length one with combiner "sum", so the result is a plain row lookup.

Gradients: SOK's backward returns IndexedSlices of *local* rows holding the sum over ranks (the
same as the hybrid path), so ``apply_reduced`` is the hybrid one (x the step's scale, then
row-wise; see gmeta.trainer.parallel.comm).
Counters: SOK's traffic bypasses ``comm``; we record the bytes this rank hands to SOK (unique
keys as ``alltoall_ids``, returned vectors as ``alltoall_vectors``) so reports stay comparable;
the backward exchange is not visible to us and is not counted.

Process setup on a GPU host: one GPU per process, pinned by the Horovod communicator before
TensorFlow creates any tensor (``init_communicator(..., one_gpu_per_process=True)``, which
``gmeta train`` passes when the backend is ``sok``), then the embedding.
"""

from __future__ import annotations

import tensorflow as tf

from gmeta.trainer.embedding.hybrid import HybridEmbedding
from gmeta.trainer.parallel.comm import HorovodCommunicator

UNAVAILABLE_REASON = "merlin-sok not importable (GPU hosts only)"
_initialised = False


def sok_available() -> tuple:
    """``(True, "")`` when SOK imports and a GPU is visible, else ``(False, reason)``."""
    try:
        import sparse_operation_kit  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False, UNAVAILABLE_REASON
    if not tf.config.list_physical_devices("GPU"):
        return False, "merlin-sok imports but no GPU is visible"
    return True, ""


def _sok():
    """Import and initialise SOK once (Horovod must already be initialised by the comm)."""
    global _initialised
    import sparse_operation_kit as sok

    if not _initialised:
        try:
            # keep tf.keras.optimizers untouched: gmeta uses no Keras optimizer
            sok.init(comm_tool="horovod", use_legacy_optimizer=False)
        except TypeError:  # SOK releases without that keyword
            sok.init(comm_tool="horovod")
        _initialised = True
    return sok


class SokEmbedding(HybridEmbedding):
    """Row-sharded tables stored as ``sok.Variable(mode="distributed")``, looked up by SOK."""

    mode = "sok"

    def __init__(self, plan, comm, optimizer, seed=0, init_stddev=0.05, name="sok_embedding"):
        if plan.replicated:
            raise ValueError(f"embedding mode 'sok' shards every table; the plan replicates {list(plan.replicated)} "
                             f"(build it with replicate_under=0)")
        ok, reason = sok_available()
        if not ok:
            raise RuntimeError(f"embedding mode 'sok' is unavailable: {reason}; "
                               f"use mode='hybrid' (same placement, CPU/GPU TF ops)")

        if not isinstance(comm, HorovodCommunicator):
            raise RuntimeError("embedding mode 'sok' needs the Horovod communicator "
                               "(init_communicator('horovod')): SOK talks through Horovod")
        self._sok = _sok()
        super().__init__(plan, comm, optimizer, seed, init_stddev, name)

    def _make_shard(self, table) -> tf.Variable:
        rank = self._comm.rank
        local_rows = self._plan.global_rows(table.name, rank)

        def initializer(shape, dtype):
            # SOK asks for its local shard; the values come from the global row ids, so the
            # table equals the hybrid/naive one for any world size
            if tuple(shape) != (local_rows.size, table.dim):
                raise RuntimeError(f"SOK shard of table {table.name!r} has shape {tuple(shape)}, "
                                   f"the plan expects {(local_rows.size, table.dim)}")
            return tf.constant(self._initial(table, local_rows), dtype=dtype)

        var = self._sok.Variable(shape=[table.num_rows, table.dim], initializer=initializer,
                                 dtype=tf.float32, mode="distributed", name=f"{table.name}_sok")
        if (getattr(var, "global_gpu_id", rank), getattr(var, "num_gpus", self._comm.size)) != \
                (rank, self._comm.size):
            raise RuntimeError("SOK's GPU numbering differs from the Horovod rank numbering; "
                               "run one process per GPU (init_communicator(..., one_gpu_per_process=True))")
        return var

    def _lookup_tables(self, requests):
        variables, bags, inverses = [], [], []
        for table, rows in requests:
            uniq, inv = tf.unique(rows, out_idx=tf.int64)
            variables.append(self.params[self.table_index(table.name)])
            bags.append(tf.RaggedTensor.from_row_lengths(uniq, tf.ones_like(uniq)))
            inverses.append(inv)
        # one fused SOK call for every table of this lookup
        vectors = self._sok.lookup_sparse(variables, bags, combiners=["sum"] * len(bags))
        vectors = [tf.reshape(v, [-1, t.dim]) for (t, _), v in zip(requests, vectors)]
        self._comm.counters.add("alltoall_ids", [b.values for b in bags])
        self._comm.counters.add("alltoall_vectors", vectors)
        return list(zip(vectors, inverses))
