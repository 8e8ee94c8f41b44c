"""The Meta-IO reader: one rank's share of a split as fixed-shape meta-batches on tf.data.

Three layers, one module each: ``gmeta.io.plan`` lists the units of work ``(file, stripe)``
from ``_index.json`` or a scan of the task columns and balances them over ranks by task count
(pure Python, identical on every rank, no collective; a stripe may be shared by two ranks, each
keeping its range of tasks); ``gmeta.io.assemble`` turns a decoded
stripe into a validated block of whole tasks and cuts padded meta-batches out of pooled blocks
(numpy only); this module orchestrates: a thread pool decodes this rank's stripes (pyarrow
releases the GIL), blocks are pooled, the pool's tasks shuffled (seed, epoch and rank fix the
order) and cut into chunks of several meta-batches, which tf.data receives through
``from_generator`` (one Python call per chunk, not per batch) and ``unbatch``es.

``steps_per_epoch = ceil(max over ranks of tasks / T)`` on every rank; ranks with fewer tasks
finish with padding tasks (``task_mask`` 0), so all ranks run the same number of steps and no
collective can deadlock. TensorFlow is imported only by ``element_spec`` / ``dataset``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from gmeta.io import fs
from gmeta.io.assemble import (STAT_KEYS, Block, Layout, batch_of, build_block, compact, empty_block, gather_packed,
                               gather_tasks)
from gmeta.io.errors import DataError
from gmeta.io.index import INDEX_FILE
from gmeta.io.plan import Unit, load_schema, plan_units, shard_tasks
from gmeta.io.stripes import OrcFileCache, read_stripe
from gmeta.io.validate import check_file_schema, check_no_nulls, task_runs

log = logging.getLogger(__name__)


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
        # meta-batches handed to tf.data per generator call (~256 tasks): amortizes the Python
        # and per-op cost of from_generator and of the split into named features
        self.batches_per_chunk = max(1, 256 // self.T)
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

    def chunks(self, epoch: int = 0, packed: bool = False) -> Iterator[dict]:
        """This rank's epoch as numpy chunks of up to ``batches_per_chunk`` meta-batches each
        (the interface dict with a leading [B] axis, or with ``packed`` the few arrays of
        ``gather_packed``); together exactly ``steps_per_epoch``.

        Stripe decoding and chunk assembly both run on the thread pool (numpy and pyarrow
        release the GIL), so they overlap with each other and with tf.data's own work.
        """
        executor = ThreadPoolExecutor(self.num_parallel_reads, thread_name_prefix="gmeta-io")
        ahead = deque()
        try:
            for pool, sel, n_batches in self._chunk_plan(epoch, executor):
                work = (executor.submit(gather_packed, pool, sel, n_batches, self.T, self.S, self.Q) if packed else
                        executor.submit(gather_tasks, pool, sel, n_batches, self.T, self.S, self.Q, self._layout))
                ahead.append((work, n_batches, sel.size))
                if len(ahead) > 2 * self.num_parallel_reads:
                    yield self._collect(epoch, *ahead.popleft())
            while ahead:
                yield self._collect(epoch, *ahead.popleft())
        except DataError as exc:
            self.error = exc
            raise
        finally:
            for f, _, _ in ahead:
                f.cancel()
            executor.shutdown(wait=True, cancel_futures=True)

    def _collect(self, epoch: int, future, n_batches: int, real_tasks: int) -> dict:
        chunk = future.result()
        self._count(epoch, {"batches": n_batches, "padding_tasks": n_batches * self.T - real_tasks})
        return chunk

    def _count(self, epoch: int, counts: dict) -> None:
        mine = self.stats_by_epoch.setdefault(epoch, dict.fromkeys(STAT_KEYS, 0))
        for k, v in counts.items():
            self.stats[k] += v
            mine[k] += v

    def epoch_stats(self, epoch: int) -> dict:
        """What reading ``epoch`` counted (each epoch once: the next epoch's read-ahead counts
        under its own number). Complete once the epoch's last batch has been taken."""
        return dict(self.stats_by_epoch.get(epoch, dict.fromkeys(STAT_KEYS, 0)))

    def _chunk_plan(self, epoch: int, executor: ThreadPoolExecutor) -> Iterator[tuple]:
        """``(pool block, task indices, batches)`` per chunk: read blocks into a shuffle pool,
        cut it into chunks of whole batches (the remainder waits for the next blocks), pad the
        last batch, then add padding-only batches up to ``steps_per_epoch``."""
        rng = self._rng(epoch, 1)
        chunk = self.batches_per_chunk * self.T
        buffer = max(self.shuffle_buffer_tasks, chunk) if self.shuffle else chunk
        parts, held, emitted = [], 0, 0
        for block, stats in self._blocks(executor, self.unit_order(epoch)):
            self._count(epoch, stats)
            parts.append(block)
            held += block.tasks
            if held >= buffer:
                pool = Block.concat(parts)
                order = rng.permutation(pool.tasks) if self.shuffle else np.arange(pool.tasks)
                cut = pool.tasks - pool.tasks % chunk
                for lo in range(0, cut, chunk):
                    emitted += self.batches_per_chunk
                    yield pool, order[lo:lo + chunk], self.batches_per_chunk
                parts = [compact(pool, order[cut:])] if cut < pool.tasks else []
                held = pool.tasks - cut
        if parts:
            pool = Block.concat(parts)
            order = rng.permutation(pool.tasks) if self.shuffle else np.arange(pool.tasks)
            for lo in range(0, pool.tasks, chunk):
                sel = order[lo:lo + chunk]
                n_batches = -(-sel.size // self.T)
                emitted += n_batches
                yield pool, sel, n_batches
        if emitted > self.steps_per_epoch:
            raise RuntimeError(f"rank {self.rank} produced {emitted} batches > steps_per_epoch "
                               f"{self.steps_per_epoch}: the plan does not match the data")
        while emitted < self.steps_per_epoch:
            n_batches = min(self.batches_per_chunk, self.steps_per_epoch - emitted)
            emitted += n_batches
            yield self._empty, np.zeros(0, np.int64), n_batches

    def numpy_batches(self, epoch: int = 0) -> Iterator[dict]:
        """The same meta-batches as ``dataset(epoch)``, as dicts of numpy arrays (no TensorFlow)."""
        for chunk in self.chunks(epoch):
            for b in range(chunk["task_id"].shape[0]):
                yield batch_of(chunk, b)

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
        int64 rows [int_width, T, cap], the float32 rows [n_floats, T, cap] and the mask [T, cap]."""
        import tensorflow as tf

        lead, T, lay = list(leading), self.T, self._layout
        spec = {"task_id": tf.TensorSpec(lead + [T], tf.int64), "task_mask": tf.TensorSpec(lead + [T], tf.float32)}
        for side, cap in (("support", self.S), ("query", self.Q)):
            spec[side] = {"ints": tf.TensorSpec(lead + [lay.int_width, T, cap], tf.int64),
                          "floats": tf.TensorSpec(lead + [len(lay.float_names), T, cap], tf.float32),
                          "mask": tf.TensorSpec(lead + [T, cap], tf.float32)}
        return spec

    def unpack(self, packed: dict) -> dict:
        """A packed meta-batch as the interface's dict (TensorFlow ops: inside a traced step they
        are slices, so the batch crosses from Python to the graph as 8 tensors, not one per
        feature: an eager hand-off of the demo's 32-tensor batch measured 0.222 ms, packed 0.087)."""
        import tensorflow as tf

        out = {"task_id": packed["task_id"], "task_mask": packed["task_mask"]}
        for side in ("support", "query"):
            x_int, x_flt = packed[side]["ints"], packed[side]["floats"]
            d = {}
            for name, slot in self._layout.slots.items():
                d[name] = tf.transpose(x_int[slot], [1, 2, 0]) if isinstance(slot, slice) else x_int[slot]
            for j, name in enumerate(self._layout.float_names):
                d[name] = x_flt[j]
            d["mask"] = packed[side]["mask"]
            out[side] = d
        return out

    @staticmethod
    def slice_tasks(batch: dict, lo: int, hi: int, packed: bool = False) -> dict:
        """Tasks ``[lo, hi)`` of a meta-batch (the task axis is 1 in a packed batch's rows)."""
        import tensorflow as tf

        if not packed:
            return tf.nest.map_structure(lambda t: t[lo:hi], batch)
        out = {"task_id": batch["task_id"][lo:hi], "task_mask": batch["task_mask"][lo:hi]}
        for side in ("support", "query"):
            d = batch[side]
            out[side] = {"ints": d["ints"][:, lo:hi], "floats": d["floats"][:, lo:hi], "mask": d["mask"][lo:hi]}
        return out

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

    def dataset(self, epoch: int = 0, packed: bool = False):
        """A ``tf.data.Dataset`` of exactly ``steps_per_epoch`` meta-batches (static shapes):
        interface dicts, or with ``packed`` the packed batches ``unpack`` turns into them.

        The generator hands over chunks of ``batches_per_chunk`` meta-batches (one Python call
        and one conversion per array per chunk, not per batch); ``unbatch`` splits them.
        A DataError met while reading surfaces from the iterator as a TensorFlow error whose
        message carries the DataError text; it is also kept in ``reader.error``.
        """
        import tensorflow as tf

        if packed:
            # the generator's row arrays are [rows, B, T, cap]; the chunk axis goes first for unbatch
            spec = self.packed_element_spec(leading=(None,))
            chunk_spec = dict(spec)
            for side in ("support", "query"):
                chunk_spec[side] = {k: (tf.TensorSpec([v.shape[1], None, *v.shape[2:]], v.dtype)
                                        if k in ("ints", "floats") else v) for k, v in spec[side].items()}
            ds = tf.data.Dataset.from_generator(lambda: self.chunks(epoch, packed=True), output_signature=chunk_spec)
            ds = ds.map(_chunk_axis_first)
        else:
            ds = tf.data.Dataset.from_generator(lambda: self.chunks(epoch),
                                                output_signature=self.element_spec(leading=(None,)))
        ds = ds.unbatch()
        ds = ds.apply(tf.data.experimental.assert_cardinality(self.steps_per_epoch))
        if self.prefetch:
            ds = ds.prefetch(self.prefetch)
        return ds


def _chunk_axis_first(chunk: dict) -> dict:
    """A packed chunk's row arrays [rows, B, T, cap] -> [B, rows, T, cap] (the batch axis first)."""
    import tensorflow as tf

    out = dict(chunk)
    for side in ("support", "query"):
        d = dict(chunk[side])
        for k in ("ints", "floats"):
            d[k] = tf.transpose(d[k], [1, 0, 2, 3])
        out[side] = d
    return out
