"""What every embedding backend shares: input checks, id cleaning, and scattering rows back.

A backend only says how to fetch the vectors of clean global rows of all requested tables in
one go (``_lookup_tables``), which tables it holds whole on every rank (``_local_table``: those
are gathered here directly) and how to apply gradients; this base turns a ``{feature: ids}``
dict into those rows (all features sharing a table concatenated, so their ids are deduplicated
together) and puts the vectors back in place, with zeros for ids < 0.

Collective safety: ``lookup`` visits tables in plan order and skips only tables none of whose
features were passed, so every rank must pass the same feature names (shapes may differ,
empty is fine); then every rank issues the same collectives in the same order.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gmeta.trainer.embedding.initial import initial_rows
from gmeta.trainer.embedding.plan import ShardingPlan, TableConfig
from gmeta.trainer.embedding.row_optim import RowOptimizer, RowOptimizerConfig


def gather_or_zero(vectors: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """``vectors[index]`` with ``index == len(vectors)`` meaning a zero row.

    The gradient is a dense segment sum back onto ``vectors`` (never IndexedSlices), so it can
    travel straight into the reverse AlltoAll.
    """
    dim = vectors.shape[-1]
    k = tf.shape(vectors, out_type=tf.int64)[0]

    @tf.custom_gradient
    def _gather(v):
        padded = tf.concat([v, tf.zeros([1, dim], v.dtype)], axis=0)

        def grad(dy):
            return tf.math.unsorted_segment_sum(dy, index, k + 1)[:-1]
        return tf.gather(padded, index), grad

    return _gather(vectors)


def clean_rows(table: TableConfig, rows: tf.Tensor, features) -> tf.Tensor:
    """Non-negative ids -> global rows: the table's id rule, range-checked when not hashed.

    Every lookup of a table goes through here (the backends' and the serving SavedModel's), so an
    id means the same row, and fails the same way, in training and in serving. ``features``: the
    table's features, named in the error.
    """
    if table.hashed:
        return table.rows_of(rows)
    check = tf.debugging.assert_less(
        rows, tf.constant(table.num_rows, tf.int64),
        # no quotes in the message: graph-mode errors print them escaped
        message=(f"embedding table {table.name}: id out of range, must be < num_rows="
                 f"{table.num_rows} (features: {', '.join(features)}; "
                 f"set hashed=True to reduce ids modulo num_rows)"))
    with tf.control_dependencies([check]):
        return tf.identity(rows)


def gather_local(table: tf.Variable, rows: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """``table[rows]`` with zeros where ``valid`` is false: a whole table held locally, looked up
    at every position at once (static shapes, a handful of ops per table).

    The gradient is IndexedSlices of every position, with index -1 where the id was < 0: segment
    sums (``pack_touched``, dense conversion) drop those, so they add nothing and touch no row.
    The rows are gathered from the variable itself: reading it as a tensor first copies all of
    it once a sparse update has touched it (8 ms for a 1M x 32 table).
    """
    @tf.custom_gradient
    def _gather(valid_f):
        def grad(dy, variables):
            slices = tf.IndexedSlices(dy, tf.where(valid, rows, tf.constant(-1, rows.dtype)),
                                      tf.shape(table, out_type=rows.dtype))
            return tf.zeros_like(valid_f), [slices for _ in variables]
        return tf.where(valid[:, None], tf.gather(table, rows), tf.zeros([], table.dtype)), grad

    return _gather(tf.cast(valid, table.dtype))   # (an input of its own: a custom gradient needs one)


class EmbeddingBase(tf.Module):
    """Common front end of the hybrid, naive and SOK embeddings (see module docstring)."""

    mode = "base"

    def __init__(self, plan: ShardingPlan, comm, optimizer: RowOptimizerConfig, seed: int = 0,
                 init_stddev: float = 0.05, name: str = "embedding"):
        super().__init__(name=name)
        if plan.world_size != comm.size:
            raise ValueError(
                f"the sharding plan was built for world_size={plan.world_size} but the "
                f"communicator has size {comm.size}; build it with "
                f"ShardingPlan.build(..., world_size=comm.size)")
        if not isinstance(optimizer, RowOptimizerConfig):
            raise TypeError(f"optimizer must be a RowOptimizerConfig, got {type(optimizer).__name__}")
        self._plan = plan
        self._comm = comm
        self.seed = int(seed)
        self.init_stddev = float(init_stddev)
        self.optimizer = RowOptimizer(optimizer)
        self.params = []   # one variable per table, plan order
        self.slots = []    # one dict of slot variables per table, plan order

    # ---- construction helpers ----
    def _initial(self, table: TableConfig, rows: np.ndarray) -> np.ndarray:
        return initial_rows(self.seed, table.name, rows, table.dim, self.init_stddev)

    def _add_table(self, table: TableConfig, var: tf.Variable) -> None:
        self.params.append(var)
        self.slots.append(self.optimizer.create_slots(var, f"{table.name}"))

    @property
    def plan(self) -> ShardingPlan:
        return self._plan

    @property
    def comm(self):
        return self._comm

    @property
    def trainable_variables(self):
        """This rank's table variables in plan order (what ``apply_gradients`` expects)."""
        return tuple(self.params)

    def table_index(self, name: str) -> int:
        return self._plan.table_index(name)

    def state_variables(self) -> dict:
        """This rank's shard of every table and its row-wise optimizer state, by name.

        Names do not depend on the world size (``table/<name>`` is this rank's rows of that
        table, in the plan's local-row order); ``gather_full_table`` turns a shard into the
        whole table.
        """
        state = {}
        for table, var, slots in zip(self._plan.tables, self.params, self.slots):
            state[f"table/{table.name}"] = var
            for slot, v in slots.items():
                state[f"table/{table.name}/{slot}"] = v
        state["table_optimizer/iterations"] = self.optimizer.iterations
        return state

    def state_rows(self, name: str) -> np.ndarray:
        """Global row ids of this rank's ``table/<name>`` variable and its slots, in their row
        order (int64): what a checkpoint stores next to the values, so that a checkpoint written
        by N workers re-shards onto M (``gmeta.trainer.checkpoint.assemble``)."""
        return self._plan.global_rows(name, self._comm.rank)

    def memory_bytes(self) -> int:
        """Bytes of parameters plus optimizer slots held by this rank."""
        total = 0
        for var, slots in zip(self.params, self.slots):
            for v in [var] + list(slots.values()):
                total += int(np.prod(v.shape)) * v.dtype.size
        return total

    # ---- forward ----
    def lookup(self, features: dict) -> dict:
        """``{feature: int ids of any shape}`` -> ``{feature: float32 ids.shape + [dim]}``."""
        unknown = sorted(set(features) - set(self._plan.features))
        if unknown:
            raise KeyError(f"features {unknown} have no embedding table; the plan knows "
                           f"{list(self._plan.features)}")
        requests, layouts, flat_outs = [], [], {}
        for table in self._plan.tables:
            feats = [f for f in self._plan.features_of(table.name) if f in features]
            if not feats:
                continue
            ids = []
            for f in feats:
                t = tf.convert_to_tensor(features[f])
                if not t.dtype.is_integer:
                    raise TypeError(f"feature {f!r}: ids must be integers, got {t.dtype.name}")
                ids.append(tf.cast(t, tf.int64))
            flats = [tf.reshape(t, [-1]) for t in ids]
            flat = flats[0] if len(flats) == 1 else tf.concat(flats, axis=0)
            layouts.append((table, feats, ids, flats))
            whole = self._local_table(table)
            if whole is not None:
                # a whole table on this rank: one gather of every position (ids < 0 -> zeros),
                # where the general path below cost ~15 ops and two more gathers per table
                valid = flat >= 0
                rows = clean_rows(table, tf.maximum(flat, 0), self._plan.features_of(table.name))
                flat_outs[table.name] = gather_local(whole, rows, valid)
                continue
            pos = tf.where(flat >= 0)[:, 0]
            requests.append((table, clean_rows(table, tf.gather(flat, pos),
                                                  self._plan.features_of(table.name))))
            flat_outs[table.name] = (flat, pos)
        fetched = self._lookup_tables(requests) if requests else []
        for (table, _), (vectors, src) in zip(requests, fetched):
            # every position gets the index of its vector; ids < 0 point at the zero row
            flat, pos = flat_outs[table.name]
            n = tf.size(flat, out_type=tf.int64)
            k = tf.shape(vectors, out_type=tf.int64)[0]
            index = tf.tensor_scatter_nd_update(tf.fill([n], k), pos[:, None], src)
            flat_outs[table.name] = gather_or_zero(vectors, index)
        out = {}
        for table, feats, ids, flats in layouts:
            flat_out = flat_outs[table.name]
            if len(flats) == 1:
                parts = [flat_out]
            else:
                parts = tf.split(flat_out, tf.stack([tf.size(x) for x in flats]), axis=0)
            for f, t, p in zip(feats, ids, parts):
                out[f] = tf.reshape(p, tf.concat([tf.shape(t), [table.dim]], axis=0))
        return out

    def _local_table(self, table: TableConfig):
        """The variable holding all of ``table`` on this rank when its lookup is a plain local
        gather (the same answer on every rank), else None: the table goes to ``_lookup_tables``."""
        return None

    def _lookup_tables(self, requests: list) -> list:
        """Fetch rows of several tables at once.

        ``requests``: ``[(table, rows int64 [m])]`` with clean global rows, in plan order (the
        same tables on every rank). Returns ``[(vectors [K, dim], src [m])]`` with
        ``vectors[src[i]]`` the value of ``rows[i]``.
        """
        raise NotImplementedError

    # ---- backward (the scaling rule is gmeta.trainer.parallel.comm's) ----
    def reduction_inputs(self, grads) -> list:
        """Tensors of this rank that must be summed over ranks before ``apply_reduced``.

        Sharded tables need none (their gradients come home through the AlltoAll backward
        pass, already summed over ranks); the replicated baseline returns its dense gradients
        so they travel in the step's one fused allreduce.
        """
        return []

    def apply_reduced(self, grads, reduced, scale) -> None:
        """Row-wise update with ``scale`` x (sum over ranks of the gradient); ``reduced`` is the
        summed ``reduction_inputs(grads)``."""
        raise NotImplementedError

    def apply_gradients(self, grads, scale=1.0) -> None:
        """Standalone update (tests, benchmarks): ``grads`` from
        ``tape.gradient(loss, emb.trainable_variables)``; every row steps with ``scale`` x the
        sum over ranks of its gradient (pass ``1 / N`` when each rank's loss is a mean)."""
        grads = self._check_grads(grads)
        inputs = self.reduction_inputs(grads)
        self.apply_reduced(grads, self._comm.allreduce_sum(inputs) if inputs else [], scale)

    def _check_grads(self, grads) -> list:
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"apply_gradients got {len(grads)} gradients for "
                             f"{len(self.params)} embedding variables (pass the result of "
                             f"tape.gradient(loss, emb.trainable_variables))")
        return grads

    # ---- whole tables (tests, checkpoints, export) ----
    def after_load(self) -> None:
        """Called on every rank after its state variables were assigned (checkpoint load,
        ``--init-from``); a backend with derived copies of rows refreshes them here."""

    def gather_full_table(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def set_full_table(self, name: str, values) -> None:
        raise NotImplementedError

    def _check_full(self, name: str, values) -> np.ndarray:
        table = self._plan.table(name)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (table.num_rows, table.dim):
            raise ValueError(f"table {name!r} is [{table.num_rows}, {table.dim}], "
                             f"got values of shape {list(values.shape)}")
        return values


def dedupe_rows(grad) -> tuple:
    """Gradient (IndexedSlices or dense) -> ``(unique rows int64 [K], summed values [K, dim])``."""
    if isinstance(grad, tf.IndexedSlices):
        rows, idx = tf.unique(tf.cast(grad.indices, tf.int64), out_idx=tf.int64)
        values = tf.math.unsorted_segment_sum(grad.values, idx, tf.size(rows, out_type=tf.int64))
        return rows, values
    grad = tf.convert_to_tensor(grad)
    return tf.range(tf.shape(grad, out_type=tf.int64)[0]), grad


def pack_touched(grad, num_rows: int, dim: int, dtype):
    """A replicated table's gradient for the step's fused allreduce: ``[num_rows, dim + 1]``,
    the gradient as a dense table and, last, how many times each row was looked up (zeros for
    a table without a gradient, so every rank sends the same tensors)."""
    if grad is None:
        return tf.zeros([num_rows, dim + 1], dtype)
    if not isinstance(grad, tf.IndexedSlices):
        grad = tf.IndexedSlices(tf.convert_to_tensor(grad), tf.range(num_rows, dtype=tf.int64))
    rows = tf.cast(grad.indices, tf.int64)
    positions = grad.values.shape[0]
    if positions is None or positions <= num_rows:
        values = tf.concat([grad.values, tf.ones_like(grad.values[:, :1])], axis=1)
        return tf.math.unsorted_segment_sum(values, rows, num_rows)
    # more looked-up positions than rows (a small table, a list feature's padding): summed apart
    # and joined per row, not per position (~0.1 ms a table in a MeLU step); the same sums
    touched = tf.math.unsorted_segment_sum(tf.ones_like(rows, grad.values.dtype), rows, num_rows)
    return tf.concat([tf.math.unsorted_segment_sum(grad.values, rows, num_rows), touched[:, None]], axis=1)


def unpack_touched(summed) -> tuple:
    """``pack_touched`` summed over ranks -> ``(rows any rank touched, their summed gradients)``."""
    rows = tf.where(summed[:, -1] > 0)[:, 0]
    return rows, tf.gather(summed[:, :-1], rows)
