"""The Meta-IO reader: one rank's share of a split as fixed-shape meta-batches on tf.data.

Three layers, one module each: ``gmeta.io.plan`` lists the units of work ``(file, stripe)``
from ``_index.json`` or a scan of the task columns and balances them over ranks by task count
(pure Python, identical on every rank, no collective; a stripe may be shared by two ranks, each
keeping its range of tasks); ``gmeta.io.assemble`` turns a decoded
stripe into a validated block of whole tasks and cuts padded meta-batches out of pooled blocks
(numpy only); this module orchestrates: a thread pool decodes this rank's stripes (pyarrow
releases the GIL), blocks are pooled, the pool's tasks shuffled (seed, epoch and rank fix the
order) and cut into whole meta-batches. tf.data receives one window per pool (or per
``batches_per_window`` batches of it) through ``numpy_function``: the pool's rows, without a
copy, and its batches' row numbers; TensorFlow gathers the rows itself, so no Python runs per
batch.

``steps_per_epoch = ceil(max over ranks of tasks / T)`` on every rank; ranks with fewer tasks
finish with padding tasks (``task_mask`` 0), so all ranks run the same number of steps and no
collective can deadlock. TensorFlow is imported only by ``element_spec`` / ``dataset``.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from gmeta.io import fs
from gmeta.io.assemble import (STAT_KEYS, Block, Layout, batch_rows, build_block, compact, empty_block,
                               gather_packed, unpack_columns)
from gmeta.io.errors import DataError
from gmeta.io.index import INDEX_FILE
from gmeta.io.plan import Unit, load_schema, plan_units, shard_tasks
from gmeta.io.stripes import OrcFileCache, read_stripe
from gmeta.io.validate import check_file_schema, check_no_nulls, task_runs

log = logging.getLogger(__name__)

#: passes over one ``dataset`` object open at once (each iterator makes one); past this the
#: oldest unfinished pass is closed, so abandoned iterators do not keep thread pools alive
MAX_OPEN_PASSES = 8


class MetaReader:
    """Meta-batches of one rank's share of a split. See the module docstring and INTERFACES.md.

    Beyond the interface: ``shuffle_buffer_tasks`` (tasks pooled before shuffling; default
    max(8 T, 1024)), ``use_index=False`` (ignore ``_index.json`` and scan), ``numpy_batches(epoch)``
    (the same batches without TensorFlow), ``units`` / ``my_units`` / ``tasks_per_rank`` (the
    plan) and ``error`` (the last DataError met while reading). ``stats`` counts, cumulatively
    over everything read (``epoch_stats(e)``: one epoch's share): rows and tasks read,
    support/query rows dropped past S/Q, truncated
    tasks, list values dropped past ``max_len``, tasks without support or query rows, padding
    tasks and batches.
    """

    def __init__(self, dataset_dir: str, split: str = "train", rank: int = 0, world_size: int = 1,
                 tasks_per_batch: int = 32, support_size: int = 64, query_size: int = 16,
                 shuffle: bool = True, seed: int = 0, num_parallel_reads: int = 2, prefetch: int = 2,
                 shuffle_buffer_tasks: Optional[int] = None, use_index: bool = True):
        for name, value, low in (("world_size", world_size, 1), ("tasks_per_batch", tasks_per_batch, 1),
                                 ("support_size", support_size, 1), ("query_size", query_size, 1),
                                 ("num_parallel_reads", num_parallel_reads, 1), ("prefetch", prefetch, 0)):
            if int(value) < low:
                raise ValueError(f"MetaReader: {name}={value} must be >= {low}")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"MetaReader: rank={rank} must be in [0, world_size={world_size})")
        self.dataset_dir = dataset_dir
        self.split = split
        self.rank, self.world_size = int(rank), int(world_size)
        self.T, self.S, self.Q = int(tasks_per_batch), int(support_size), int(query_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.num_parallel_reads, self.prefetch = int(num_parallel_reads), int(prefetch)
        self.shuffle_buffer_tasks = int(shuffle_buffer_tasks or max(8 * self.T, 1024))
        # meta-batches per window handed to tf.data (~1024 tasks, a default pool): few calls and
        # ops per batch, while a large shuffle pool is not padded out whole (memory) before its
        # first batch is out; a larger pool is handed over as several windows (no copy)
        self.batches_per_window = max(1, 1024 // self.T)
        # a full shuffle pool is cut after a multiple of this many tasks (the rest joins the next
        # pool); ~256, as the chunks of the reader before windows, so that an epoch's batches
        # (a function of seed, epoch and rank) stayed the same through that change
        self.pool_cut_tasks = max(1, 256 // self.T) * self.T
        self.schema = load_schema(dataset_dir)
        if split not in self.schema.splits:
            log.warning("split %r is not listed in schema.json splits %s", split, list(self.schema.splits))
        self._layout = Layout(self.schema)
        self.split_dir = fs.join(dataset_dir, split)
        self.units = plan_units(self.split_dir, self.schema, use_index, self.num_parallel_reads)
        shards = shard_tasks(self.units, self.world_size)
        self.tasks_per_rank = [sum(u.share for u in s) for s in shards]
        self.my_units = shards[self.rank]
        self.num_tasks = self.tasks_per_rank[self.rank]
        self.steps_per_epoch = int(math.ceil(max(self.tasks_per_rank) / self.T))
        if not self.my_units:
            log.warning("rank %d of %d has no tasks of %s (only %d tasks); it yields padding batches only",
                        self.rank, self.world_size, self.split_dir, sum(self.tasks_per_rank))
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.stats_by_epoch = {}  # the same counts, per epoch read (see epoch_stats)
        self.error: Optional[DataError] = None  # the last DataError raised while reading
        self._empty = empty_block(self._layout)

    # ------------------------------------------------------------------ reading
    def _load_unit(self, cache: OrcFileCache, unit: Unit):
        try:
            reader = cache.get(unit.file)
        except FileNotFoundError:
            raise DataError("file disappeared since the plan was made", file=unit.file) from None
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot decode (truncated or corrupt?): {exc}", file=unit.file,
                            stripe=unit.stripe) from None
        batch = read_stripe(reader, unit.file, unit.stripe, self._layout.columns)
        check_file_schema(batch.schema, self.schema, unit.file)
        if unit.whole:
            block, stats = build_block(batch, self._layout, self.S, self.Q, unit.file, unit.stripe)
            self._check_plan(unit, batch.num_rows, block.task_id)
            return block, stats
        # a shared stripe: check it whole against the plan, then keep this rank's task range
        column = self.schema.task_column
        check_no_nulls({column: batch.column(column)}, unit.file, unit.stripe)
        starts, ids = task_runs(batch.column(column).to_numpy(), unit.file, unit.stripe, column)
        self._check_plan(unit, batch.num_rows, ids)
        bounds = np.append(starts, batch.num_rows)
        part = batch.slice(int(bounds[unit.lo]), int(bounds[unit.lo + unit.share] - bounds[unit.lo]))
        return build_block(part, self._layout, self.S, self.Q, unit.file, unit.stripe)

    def _check_plan(self, unit: Unit, rows: int, ids: np.ndarray) -> None:
        if ids.size == 0:
            raise DataError("stripe has no rows", file=unit.file, stripe=unit.stripe)
        if (rows, ids.size, int(ids[0]), int(ids[-1])) != (unit.rows, unit.tasks, unit.first_task, unit.last_task):
            raise DataError(f"stripe holds {rows} rows / {ids.size} tasks ({ids[0]}..{ids[-1]}) but "
                            f"the plan ({INDEX_FILE}) says {unit.rows} / {unit.tasks} ({unit.first_task}.."
                            f"{unit.last_task}); the file changed after it was indexed",
                            file=unit.file, stripe=unit.stripe, column=self.schema.task_column)

    def _blocks(self, executor: ThreadPoolExecutor, units) -> Iterator:
        """Decoded blocks of ``units`` in order, ``2 * num_parallel_reads`` stripes in flight."""
        cache = OrcFileCache()
        pending = deque()
        try:
            it = iter(units)
            for unit in it:
                pending.append(executor.submit(self._load_unit, cache, unit))
                if len(pending) >= 2 * self.num_parallel_reads:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(executor.submit(self._load_unit, cache, nxt))
                yield result
        finally:
            for f in pending:
                f.cancel()

    def unit_order(self, epoch: int) -> list:
        """This rank's units in reading order for ``epoch`` (file order unless shuffling)."""
        if not self.shuffle:
            return list(self.my_units)
        perm = self._rng(epoch, 0).permutation(len(self.my_units))
        return [self.my_units[i] for i in perm]

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), self.rank, stream])

    def windows(self, epoch: int = 0) -> Iterator[tuple]:
        """This rank's epoch as ``(pool block, BatchRows)`` windows of up to ``batches_per_window``
        batches: each shuffle pool's whole meta-batches (the remainder waits for the next blocks),
        then the last tasks padded, then padding-only batches up to ``steps_per_epoch``; together
        exactly ``steps_per_epoch``.

        Stripes are decoded and turned into blocks on the thread pool (pyarrow and numpy release
        the GIL), ``2 * num_parallel_reads`` ahead; the pool's shuffle and the row numbers of its
        batches are computed here (vectorized); the gather is left to the consumer.
        """
        executor = ThreadPoolExecutor(self.num_parallel_reads, thread_name_prefix="gmeta-io")
        try:
            for pool, sel, n_batches in self._window_plan(epoch, executor):
                self._count(epoch, {"batches": n_batches, "padding_tasks": n_batches * self.T - sel.size})
                rows = batch_rows(pool, sel, n_batches, self.T, self.S, self.Q)
                for lo in range(0, n_batches, self.batches_per_window):
                    yield pool, rows[lo:lo + self.batches_per_window]
        except DataError as exc:
            self.error = exc
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def _count(self, epoch: int, counts: dict) -> None:
        mine = self.stats_by_epoch.setdefault(epoch, dict.fromkeys(STAT_KEYS, 0))
        for k, v in counts.items():
            self.stats[k] += v
            mine[k] += v

    def epoch_stats(self, epoch: int) -> dict:
        """What reading ``epoch`` counted (each epoch once: the next epoch's read-ahead counts
        under its own number). Complete once the epoch's last batch has been taken."""
        return dict(self.stats_by_epoch.get(epoch, dict.fromkeys(STAT_KEYS, 0)))

    def _window_plan(self, epoch: int, executor: ThreadPoolExecutor) -> Iterator[tuple]:
        """``(pool block, task indices, batches)`` per window: read blocks into a shuffle pool,
        cut it into whole batches (the remainder waits for the next blocks), pad the last batch,
        then add padding-only batches up to ``steps_per_epoch``."""
        rng = self._rng(epoch, 1)
        unit = self.pool_cut_tasks
        buffer = max(self.shuffle_buffer_tasks, unit) if self.shuffle else unit
        parts, held, emitted = [], 0, 0
        for block, stats in self._blocks(executor, self.unit_order(epoch)):
            self._count(epoch, stats)
            parts.append(block)
            held += block.tasks
            if held >= buffer:
                pool = Block.concat(parts)
                order = rng.permutation(pool.tasks) if self.shuffle else np.arange(pool.tasks)
                cut = pool.tasks - pool.tasks % unit
                if cut:
                    emitted += cut // self.T
                    yield pool, order[:cut], cut // self.T
                parts = [compact(pool, order[cut:])] if cut < pool.tasks else []
                held = pool.tasks - cut
        if parts:
            pool = Block.concat(parts)
            order = rng.permutation(pool.tasks) if self.shuffle else np.arange(pool.tasks)
            n_batches = -(-pool.tasks // self.T)
            if n_batches:
                emitted += n_batches
                yield pool, order, n_batches
        if emitted > self.steps_per_epoch:
            raise RuntimeError(f"rank {self.rank} produced {emitted} batches > steps_per_epoch "
                               f"{self.steps_per_epoch}: the plan does not match the data")
        if emitted < self.steps_per_epoch:
            yield self._empty, np.zeros(0, np.int64), self.steps_per_epoch - emitted

    def numpy_batches(self, epoch: int = 0, packed: bool = False) -> Iterator[dict]:
        """The same meta-batches as ``dataset(epoch, packed)``, as dicts of numpy arrays (no
        TensorFlow)."""
        for pool, rows in self.windows(epoch):
            for b in range(rows.batches):
                batch = gather_packed(pool, rows[b])
                yield batch if packed else unpack_columns(batch, self._layout)

    def element_spec(self, leading=()) -> dict:
        """``tf.TensorSpec``s of one meta-batch (``leading`` dims prepended, e.g. ``(None,)``)."""
        import tensorflow as tf

        lead, T = list(leading), self.T
        spec = {"task_id": tf.TensorSpec(lead + [T], tf.int64), "task_mask": tf.TensorSpec(lead + [T], tf.float32)}
        for side, cap in (("support", self.S), ("query", self.Q)):
            d = {}
            for f in self.schema.sparse:
                d[f.name] = tf.TensorSpec(lead + [T, cap] + ([f.max_len] if f.is_list else []), tf.int64)
            for name in self._layout.float_names:
                d[name] = tf.TensorSpec(lead + [T, cap], tf.float32)
            d["mask"] = tf.TensorSpec(lead + [T, cap], tf.float32)
            spec[side] = d
        return spec

    def packed_element_spec(self, leading=()) -> dict:
        """``tf.TensorSpec``s of one packed meta-batch (``dataset(packed=True)``): per side the
        int64 columns [T, cap, int_width], the float32 columns [T, cap, n_floats] and the mask
        [T, cap]."""
        import tensorflow as tf

        lead, T, lay = list(leading), self.T, self._layout
        spec = {"task_id": tf.TensorSpec(lead + [T], tf.int64), "task_mask": tf.TensorSpec(lead + [T], tf.float32)}
        for side, cap in (("support", self.S), ("query", self.Q)):
            spec[side] = {"ints": tf.TensorSpec(lead + [T, cap, lay.int_width], tf.int64),
                          "floats": tf.TensorSpec(lead + [T, cap, len(lay.float_names)], tf.float32),
                          "mask": tf.TensorSpec(lead + [T, cap], tf.float32)}
        return spec

    def unpack(self, packed: dict) -> dict:
        """A packed meta-batch as the interface's dict (``unpack_columns``: inside a traced step
        these are slices, so the batch crosses from Python to the graph as 8 tensors, not one per
        feature: an eager hand-off of the demo's 32-tensor batch measured 0.222 ms, packed 0.087)."""
        return unpack_columns(packed, self._layout)

    @staticmethod
    def slice_tasks(batch: dict, lo: int, hi: int) -> dict:
        """Tasks ``[lo, hi)`` of a meta-batch, packed or not (the task axis is first everywhere)."""
        import tensorflow as tf

        return tf.nest.map_structure(lambda t: t[lo:hi], batch)

    def surfacing_errors(self, batches):
        """Iterate ``batches`` (this reader's ``dataset``); a DataError met while reading is
        raised as itself (file, stripe, column) instead of the tf.data error that carried it."""
        import tensorflow as tf

        try:
            yield from batches
        except tf.errors.OpError:
            if self.error is not None:
                raise self.error from None
            raise

    def _window_source(self):
        """``(start, fetch)`` for the tf.data pipeline: ``start(epoch)`` opens a pass over that
        epoch's windows and returns its key (each iterator of the dataset makes its own pass);
        ``fetch(key)`` returns the pass's next window as arrays, and after its last an empty one.
        The pool's row matrices are 64-byte aligned, so TensorFlow's ``numpy_function`` takes them
        over without a copy (``from_generator`` converts, that is copies, every array, and costs
        more per call). At most ``MAX_OPEN_PASSES`` passes stay open: the oldest unfinished one
        is closed (its thread pool shut down), and reading on from it is an error."""
        passes, keys, lock = OrderedDict(), itertools.count(), threading.Lock()
        empty = self._empty
        nothing = batch_rows(empty, np.zeros(0, np.int64), 0, self.T, self.S, self.Q)

        def start(epoch):
            with lock:
                key = next(keys)
                passes[key] = self.windows(int(epoch))
                while len(passes) > MAX_OPEN_PASSES:
                    passes.popitem(last=False)[1].close()
            return np.int64(key)

        def fetch(key):
            with lock:
                windows = passes.get(int(key))
                if windows is None:
                    raise RuntimeError(f"this pass over {self.split_dir} was closed: more than "
                                       f"{MAX_OPEN_PASSES} passes over the dataset were open at once")
                try:
                    pool, rows = next(windows)
                except StopIteration:
                    del passes[int(key)]
                    pool, rows = empty, nothing
            return pool.ints, pool.flts, rows.task_id, rows.task_mask, rows.support, rows.query

        return start, fetch

    def dataset(self, epoch: int = 0, packed: bool = False, epochs: int = 1):
        """A ``tf.data.Dataset`` of exactly ``steps_per_epoch`` meta-batches (static shapes) of
        each of ``epochs`` epochs from ``epoch`` on: interface dicts, or with ``packed`` the packed
        batches ``unpack`` turns into them.

        The epochs are one pipeline whose epoch number is a tensor, so its functions are made
        ready once per iterator: a pipeline per epoch, concatenated, paid that again at every
        epoch (about 30 ms of CPU per epoch and worker, as much as 4 MeLU steps, measured on
        the `bench movielens` data).

        Python hands over one window per shuffle pool or per ``batches_per_window`` batches of
        it: the pool's rows, without a copy, and the row numbers of its batches; TensorFlow
        gathers the window's batches in one op per side and dtype (its own threads, no per-batch
        Python), while the next window is prepared.
        A DataError met while reading surfaces from the iterator as a TensorFlow error whose
        message carries the DataError text; it is also kept in ``reader.error``.
        """
        import tensorflow as tf

        lay, T = self._layout, self.T
        dtypes = (tf.int64, tf.float32, tf.int64, tf.float32, tf.int64, tf.int64)
        shapes = ([None, lay.int_width], [None, len(lay.float_names)], [None, T], [None, T], [None, T, self.S],
                  [None, T, self.Q])
        start, fetch = self._window_source()

        def batches(*arrays):
            window = _gather_rows(*arrays)  # [batches, ...]; unpack slices the last axis once per window
            return tf.data.Dataset.from_tensor_slices(window if packed else self.unpack(window))

        def one_pass(epoch_no):
            key = tf.numpy_function(start, [epoch_no], tf.int64, stateful=True, name="meta_io_start")

            def window(_):
                arrays = tf.numpy_function(fetch, [key], dtypes, stateful=True, name="meta_io_window")
                for array, shape in zip(arrays, shapes):
                    array.set_shape(shape)
                return tuple(arrays)

            # every window holds >= 1 batch, so steps_per_epoch + 1 fetches reach the empty one
            windows = tf.data.Dataset.range(self.steps_per_epoch + 1).map(window)
            return windows.take_while(lambda *w: tf.shape(w[2])[0] > 0)

        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        epoch_numbers = tf.data.Dataset.range(epoch, epoch + epochs)
        ds = epoch_numbers.flat_map(one_pass).prefetch(1).flat_map(batches)
        ds = ds.apply(tf.data.experimental.assert_cardinality(self.steps_per_epoch * epochs))
        if self.prefetch:
            ds = ds.prefetch(self.prefetch)
        return ds


def _gather_rows(ints, flts, task_id, task_mask, rows_s, rows_q) -> dict:
    """Packed meta-batches with a leading [batches] axis from a pool's rows: one row gather per
    side and dtype for all of them (the same arithmetic as ``gather_packed``); the padding row is
    the pool's last."""
    import tensorflow as tf

    pad = tf.shape(ints, out_type=tf.int64)[0] - 1
    out = {"task_id": task_id, "task_mask": task_mask}
    for side, rows in (("support", rows_s), ("query", rows_q)):
        out[side] = {"ints": tf.gather(ints, rows), "floats": tf.gather(flts, rows),
                     "mask": tf.cast(tf.not_equal(rows, pad), tf.float32)}
    return out
