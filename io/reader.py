"""The Meta-IO reader: task-grouped ORC stripes -> fixed-shape meta-batches on a tf.data pipeline.

Plan (pure Python, from metadata only, identical on every rank, no collective): list the split's
ORC files, take the units of work ``(file, stripe)`` from ``_index.json`` (or scan each stripe's
task column when there is no current index), and assign units to ranks greedily by task count.
``steps_per_epoch = ceil(max over ranks of tasks / T)`` on every rank; ranks with fewer tasks
finish with padding tasks (``task_mask`` 0), so all ranks run the same number of steps and no
collective can deadlock.

Read: a thread pool decodes this rank's stripes with pyarrow (which releases the GIL) and turns
each into a validated block: the rows as feature-major numpy arrays (one int64, one float32, each
with a trailing padding column) and, per task, where its support and query rows start and how
many are used. Everything is vectorized (run starts from ``np.not_equal``, per-task counts from
``np.add.reduceat``; no Python loop over rows or tasks). Blocks are pooled, the pool's tasks
shuffled (seed, epoch and rank fix the order) and cut into chunks of several meta-batches; a
chunk is ONE ``np.take`` per dtype and side with source indices made by broadcasting
``start + position`` (or the padding column). tf.data receives chunks through
``from_generator`` (one Python call per chunk, not per batch) and ``unbatch``es them.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc

from gmeta.io import fs
from gmeta.io.errors import DataError
from gmeta.io.schema import Schema, SchemaError
from gmeta.io.validate import (check_file_schema, check_finite, check_id_values, check_ids, check_no_nulls,
                               check_query_flags, check_tasks_disjoint, summarize_stripe, task_runs)
from gmeta.io.writer import INDEX_FILE, INDEX_FORMAT, INDEX_VERSION

log = logging.getLogger(__name__)

STAT_KEYS = ("rows_read", "tasks_read", "support_rows_dropped", "query_rows_dropped", "truncated_tasks",
             "list_values_dropped", "tasks_without_support", "tasks_without_query", "padding_tasks",
             "batches")


@dataclass(frozen=True)
class Unit:
    """One stripe of one file: the unit of sharding and of parallel reading."""

    file: str
    stripe: int
    rows: int
    tasks: int
    first_task: int
    last_task: int


def shard_units(unit_tasks, world_size: int) -> list:
    """Unit indices per rank, balancing task counts (largest first onto the least loaded rank;
    ties go to the lower unit index and the lower rank, so every rank computes the same plan)."""
    heap = [(0, r) for r in range(world_size)]
    assigned = [[] for _ in range(world_size)]
    for i in sorted(range(len(unit_tasks)), key=lambda i: (-unit_tasks[i], i)):
        load, r = heapq.heappop(heap)
        assigned[r].append(i)
        heapq.heappush(heap, (load + int(unit_tasks[i]), r))
    return [sorted(a) for a in assigned]


class _Layout:
    """Which column goes where in the grouped int64 / float32 arrays."""

    def __init__(self, schema: Schema):
        self.task = schema.task_column
        self.query = schema.query_column
        single = [f for f in schema.sparse if not f.is_list]
        self.lists = [f for f in schema.sparse if f.is_list]
        self.int_names = [f.name for f in single]
        self.int_limits = np.array([schema.table(f.table).num_rows for f in single], np.int64)
        self.int_hashed = np.array([schema.table(f.table).hashed for f in single], bool)
        self.list_offsets = {}
        width = len(single)
        for f in self.lists:
            self.list_offsets[f.name] = width
            width += f.max_len
        self.int_width = width
        self.float_names = list(schema.labels) + [d.name for d in schema.dense] + list(schema.oracle)
        self.n_checked_floats = len(schema.labels) + len(schema.dense)  # oracle columns are not inputs
        self.slots = {f.name: (slice(self.list_offsets[f.name], self.list_offsets[f.name] + f.max_len)
                               if f.is_list else self.int_names.index(f.name)) for f in schema.sparse}
        self.columns = [self.task, self.query] + self.float_names + self.int_names + [f.name for f in self.lists]
        self.schema = schema


def build_block(batch: pa.RecordBatch, lay: _Layout, S: int, Q: int, file: str, stripe: int):
    """One decoded stripe -> (a ``_Block``, stats), validated. Vectorized over rows and tasks.

    Rows are stored feature-major (``ints`` int64 [int_width, n + 1] with list features expanded
    to ``max_len`` rows padded with -1, ``flts`` float32 [n_floats, n + 1]); the extra last column
    holds the padding values, so a padded batch is ONE ``np.take`` per dtype. Within each task
    the support rows are made to precede the query rows (a stable reorder, skipped when the file
    already has that order), so each side of a task is the row range ``[start, start + count)``;
    counts are capped at S / Q (rows past the cap are dropped and counted).
    """
    cols = {name: batch.column(name) for name in lay.columns}
    check_no_nulls(cols, file, stripe)
    n = batch.num_rows
    if n == 0:
        raise DataError("stripe has no rows", file=file, stripe=stripe)
    starts, ids = task_runs(cols[lay.task].to_numpy(), file, stripe, lay.task)
    flags = cols[lay.query].to_numpy()
    check_query_flags(flags, file, stripe, lay.query)

    flts = np.empty((len(lay.float_names), n + 1), np.float32)
    flts[:, n] = 0.0
    for k, name in enumerate(lay.float_names):
        flts[k, :n] = cols[name].to_numpy()
    check_finite(flts[:lay.n_checked_floats, :n].T, lay.float_names, file, stripe)
    ints = np.empty((lay.int_width, n + 1), np.int64)
    ints[:, n] = -1
    n_single = len(lay.int_names)
    for k, name in enumerate(lay.int_names):
        ints[k, :n] = cols[name].to_numpy()
    check_ids(ints[:n_single, :n].T, lay.int_names, lay.int_limits, lay.int_hashed, file, stripe)
    stats = dict.fromkeys(STAT_KEYS, 0)
    for f in lay.lists:
        arr = cols[f.name]
        offsets = np.asarray(arr.offsets)
        values = arr.values.to_numpy()[offsets[0]:offsets[-1]]
        offsets = offsets - offsets[0]
        spec = lay.schema.table(f.table)
        values = check_id_values(values, f.name, spec.num_rows, spec.hashed, file, stripe)
        lengths = np.diff(offsets)
        in_list = np.arange(values.size) - np.repeat(offsets[:-1], lengths)
        ok = in_list < f.max_len
        off = lay.list_offsets[f.name]
        ints[off:off + f.max_len] = -1
        ints[off + in_list[ok], np.repeat(np.arange(n), lengths)[ok]] = values[ok]  # pad column stays -1
        stats["list_values_dropped"] += int(values.size - np.count_nonzero(ok))

    lens = np.diff(np.append(starts, n))
    n_query = np.add.reduceat(flags, starts, dtype=np.int64)
    n_support = lens - n_query
    # a 1 -> 0 step inside a task means query rows come before support rows: reorder stably
    if n > 1 and np.any((flags[1:] < flags[:-1]) & (np.diff(cols[lay.task].to_numpy()) == 0)):
        tix = np.zeros(n, np.int64)
        tix[starts[1:]] = 1
        np.cumsum(tix, out=tix)
        order = np.append(np.argsort(tix * 2 + flags, kind="stable"), n)  # the pad column stays last
        ints, flts = np.take(ints, order, axis=1), np.take(flts, order, axis=1)
    cnt_s, cnt_q = np.minimum(n_support, S), np.minimum(n_query, Q)
    stats["rows_read"], stats["tasks_read"] = n, int(ids.size)
    stats["support_rows_dropped"] = int(n_support.sum() - cnt_s.sum())
    stats["query_rows_dropped"] = int(n_query.sum() - cnt_q.sum())
    stats["truncated_tasks"] = int(np.count_nonzero((n_support > S) | (n_query > Q)))
    stats["tasks_without_support"] = int(np.count_nonzero(n_support == 0))
    stats["tasks_without_query"] = int(np.count_nonzero(n_query == 0))
    block = _Block(ids, ints, flts, starts, cnt_s, starts + n_support, cnt_q)
    return block, stats


@dataclass
class _Block:
    """Rows of whole tasks (feature-major, plus one padding column at the end) and, per task,
    where each side's rows are."""

    task_id: np.ndarray   # [tasks] int64
    ints: np.ndarray      # [int_width, rows + 1] int64, last column -1
    flts: np.ndarray      # [n_floats, rows + 1] float32, last column 0
    start_s: np.ndarray   # [tasks] first support row
    cnt_s: np.ndarray     # [tasks] support rows used (<= S)
    start_q: np.ndarray
    cnt_q: np.ndarray

    @property
    def tasks(self) -> int:
        return self.task_id.size

    @property
    def rows(self) -> int:
        return self.ints.shape[1] - 1

    @staticmethod
    def concat(blocks: list) -> "_Block":
        if len(blocks) == 1:
            return blocks[0]
        sizes = [b.rows for b in blocks]
        total = sum(sizes)
        ints = np.empty((blocks[0].ints.shape[0], total + 1), np.int64)
        flts = np.empty((blocks[0].flts.shape[0], total + 1), np.float32)
        at = 0
        for b in blocks:  # one copy per block (a handful per shuffle window), not per row or task
            ints[:, at:at + b.rows] = b.ints[:, :b.rows]
            flts[:, at:at + b.rows] = b.flts[:, :b.rows]
            at += b.rows
        ints[:, total], flts[:, total] = -1, 0.0
        shift = np.repeat(np.cumsum([0] + sizes[:-1]), [b.tasks for b in blocks])
        cat = np.concatenate
        return _Block(cat([b.task_id for b in blocks]), ints, flts, cat([b.start_s for b in blocks]) + shift,
                      cat([b.cnt_s for b in blocks]), cat([b.start_q for b in blocks]) + shift,
                      cat([b.cnt_q for b in blocks]))


def _ranges(starts: np.ndarray, lens: np.ndarray):
    """(row indices of the ranges [start, start+len) back to back, exclusive prefix sums of lens)."""
    excl = np.cumsum(lens) - lens
    total = int(excl[-1] + lens[-1]) if lens.size else 0
    return np.repeat(starts - excl, lens) + np.arange(total), excl


def gather_tasks(pool: _Block, sel: np.ndarray, n_batches: int, T: int, S: int, Q: int, lay: "_Layout") -> dict:
    """Tasks ``pool[sel]`` as ``n_batches`` meta-batches of T tasks (slots past ``len(sel)`` are
    padding tasks), in the interface's nested dict with a leading [n_batches] axis.

    Every output position [task, pos] gets a source column by broadcasting (``start + pos`` while
    ``pos < count``, else the pad column), so each dtype of each side is one ``np.take``; the
    features are then contiguous views of its rows.
    """
    k, slots = sel.size, n_batches * T
    task_id = np.full(slots, -1, np.int64)
    task_id[:k] = pool.task_id[sel]
    task_mask = np.zeros(slots, np.float32)
    task_mask[:k] = 1.0
    out = {"task_id": task_id.reshape(n_batches, T), "task_mask": task_mask.reshape(n_batches, T)}
    for side, start, cnt, cap in (("support", pool.start_s, pool.cnt_s, S), ("query", pool.start_q, pool.cnt_q, Q)):
        lens = np.zeros((slots, 1), np.int64)
        lens[:k, 0] = cnt[sel]
        first = np.zeros((slots, 1), np.int64)
        first[:k, 0] = start[sel]
        pos = np.arange(cap)
        real = pos < lens                                        # [slots, cap]
        src = np.where(real, first + pos, pool.rows)             # its row, or the pad column
        x_int = np.take(pool.ints, src.ravel(), axis=1).reshape(-1, n_batches, T, cap)
        x_flt = np.take(pool.flts, src.ravel(), axis=1).reshape(-1, n_batches, T, cap)
        d = {}
        for name, slot in lay.slots.items():
            d[name] = np.moveaxis(x_int[slot], 0, -1) if isinstance(slot, slice) else x_int[slot]
        for j, name in enumerate(lay.float_names):
            d[name] = x_flt[j]
        d["mask"] = real.reshape(n_batches, T, cap).astype(np.float32)
        out[side] = d
    return out


def compact(pool: _Block, sel: np.ndarray) -> _Block:
    """A new block holding only tasks ``pool[sel]`` (the remainder carried to the next cut)."""
    rows_s, excl_s = _ranges(pool.start_s[sel], pool.cnt_s[sel])
    rows_q, excl_q = _ranges(pool.start_q[sel], pool.cnt_q[sel])
    cols = np.concatenate([rows_s, rows_q, [pool.rows]])
    return _Block(pool.task_id[sel], np.take(pool.ints, cols, axis=1), np.take(pool.flts, cols, axis=1), excl_s,
                  pool.cnt_s[sel], excl_q + rows_s.size, pool.cnt_q[sel])


class _OrcCache(threading.local):
    """Per-thread open ORC files (a reader object is not safe to share between threads)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.files = OrderedDict()

    def get(self, path: str) -> orc.ORCFile:
        hit = self.files.get(path)
        if hit is not None:
            self.files.move_to_end(path)
            return hit[1]
        handle = fs.open_input_file(path)
        try:
            reader = orc.ORCFile(handle)
        except Exception:
            handle.close()
            raise
        self.files[path] = (handle, reader)
        if len(self.files) > self.size:
            old_handle, _ = self.files.popitem(last=False)[1]
            old_handle.close()
        return reader


class MetaReader:
    """Meta-batches of one rank's share of a split. See the module docstring and INTERFACES.md.

    Beyond the interface: ``shuffle_buffer_tasks`` (tasks pooled before shuffling; default
    max(8 T, 1024)), ``use_index=False`` (ignore ``_index.json`` and scan), ``numpy_batches(epoch)``
    (the same batches without TensorFlow), ``units`` / ``my_units`` / ``tasks_per_rank`` (the
    plan) and ``error`` (the last DataError met while reading). ``stats`` counts, cumulatively
    over everything read: rows and tasks read, support/query rows dropped past S/Q, truncated
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
        try:
            self.schema = Schema.load(dataset_dir)
        except SchemaError as exc:
            raise DataError(str(exc)) from None
        except OSError as exc:
            raise DataError(f"cannot read schema.json: {exc}", file=fs.join(dataset_dir, "schema.json")) from None
        if split not in self.schema.splits:
            log.warning("split %r is not listed in schema.json splits %s", split, list(self.schema.splits))
        self._layout = _Layout(self.schema)
        self.split_dir = fs.join(dataset_dir, split)
        self.units = self._plan(use_index)
        shards = shard_units([u.tasks for u in self.units], self.world_size)
        self.tasks_per_rank = [sum(self.units[i].tasks for i in s) for s in shards]
        self.my_units = [self.units[i] for i in shards[self.rank]]
        self.num_tasks = self.tasks_per_rank[self.rank]
        self.steps_per_epoch = int(math.ceil(max(self.tasks_per_rank) / self.T))
        if not self.my_units:
            log.warning("rank %d of %d has no stripes of %s (only %d units); it yields padding batches only",
                        self.rank, self.world_size, self.split_dir, len(self.units))
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.error: Optional[DataError] = None  # the last DataError raised while reading
        nf = len(self._layout.float_names)
        z = np.zeros(0, np.int64)
        self._empty = _Block(z, np.full((self._layout.int_width, 1), -1, np.int64), np.zeros((nf, 1), np.float32),
                             z, z, z, z)

    # ------------------------------------------------------------------ planning
    def _plan(self, use_index: bool) -> list:
        try:
            entries = fs.list_dir(self.split_dir)
        except FileNotFoundError:
            raise DataError("split directory does not exist", file=self.split_dir) from None
        except NotADirectoryError:
            raise DataError("is not a directory", file=self.split_dir) from None
        except OSError as exc:
            raise DataError(f"cannot list directory: {exc}", file=self.split_dir) from None
        files = [e for e in entries if e.type == fs.pafs.FileType.File and e.base_name.endswith(".orc")
                 and not e.base_name.startswith((".", "_"))]
        if not files:
            raise DataError("no ORC files (*.orc) in the split directory", file=self.split_dir)
        for e in files:
            if e.size == 0:
                raise DataError("empty file (0 bytes)", file=fs.join(self.split_dir, e.base_name))
        index = self._load_index(files) if use_index else None
        if index is not None:
            units = [Unit(fs.join(self.split_dir, f["name"]), i, s["rows"], s["tasks"], s["first_task"],
                          s["last_task"]) for f in index["files"] for i, s in enumerate(f["stripes"])]
            for a, b in zip(units, units[1:]):
                if a.last_task == b.first_task:
                    raise DataError(f"task {a.last_task} is split across stripes: it also has rows in "
                                    f"{a.file} stripe {a.stripe}", file=b.file, stripe=b.stripe,
                                    column=self.schema.task_column)
            return units
        paths = [fs.join(self.split_dir, e.base_name) for e in files]
        with ThreadPoolExecutor(self.num_parallel_reads) as pool:
            scanned = list(pool.map(self._scan_file, paths))
        units, ids = [], []
        for file_units, file_ids in scanned:
            units += file_units
            ids += file_ids
        check_tasks_disjoint(ids, [(u.file, u.stripe) for u in units], self.schema.task_column)
        return units

    def _load_index(self, files) -> Optional[dict]:
        """The writer's ``_index.json`` if it describes exactly the files present, else None."""
        path = fs.join(self.split_dir, INDEX_FILE)
        try:
            index = json.loads(fs.read_text(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); scanning the files instead", path, exc)
            return None
        present = {e.base_name: e.size for e in files}
        try:
            ok = (index.get("format") == INDEX_FORMAT and index.get("version") == INDEX_VERSION
                  and {f["name"]: f["bytes"] for f in index["files"]} == present
                  and all(f["stripes"] for f in index["files"]))
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            log.warning("%s does not match the files present; scanning the files instead", path)
            return None
        return index

    def _scan_file(self, path: str):
        """Units of one file, from its task and flag columns; checks schema and task invariants."""
        s = self.schema
        try:
            handle = fs.open_input_file(path)
        except OSError as exc:
            raise DataError(f"cannot open: {exc}", file=path) from None
        with handle:
            try:
                reader = orc.ORCFile(handle)
                file_schema = reader.schema
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"not a readable ORC file (truncated or corrupt?): {exc}", file=path) from None
            check_file_schema(file_schema, s, path)
            if reader.nrows == 0 or reader.nstripes == 0:
                raise DataError("empty file: no rows", file=path)
            units, ids = [], []
            for i in range(reader.nstripes):
                try:
                    batch = reader.read_stripe(i, columns=[s.task_column, s.query_column])
                except (OSError, pa.ArrowException) as exc:
                    raise DataError(f"cannot decode (truncated or corrupt?): {exc}", file=path, stripe=i) from None
                check_no_nulls({n: batch.column(n) for n in (s.task_column, s.query_column)}, path, i)
                entry, stripe_ids = summarize_stripe(batch.column(s.task_column).to_numpy(),
                                                     batch.column(s.query_column).to_numpy(), path, i,
                                                     s.task_column, s.query_column)
                units.append(Unit(path, i, entry["rows"], entry["tasks"], entry["first_task"], entry["last_task"]))
                ids.append(stripe_ids)
        return units, ids

    # ------------------------------------------------------------------ reading
    def _load_unit(self, cache: _OrcCache, unit: Unit):
        try:
            reader = cache.get(unit.file)
            batch = reader.read_stripe(unit.stripe, columns=self._layout.columns)
        except FileNotFoundError:
            raise DataError("file disappeared since the plan was made", file=unit.file) from None
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot decode (truncated or corrupt?): {exc}", file=unit.file,
                            stripe=unit.stripe) from None
        check_file_schema(batch.schema, self.schema, unit.file)
        block, stats = build_block(batch, self._layout, self.S, self.Q, unit.file, unit.stripe)
        ids = block.task_id
        if (batch.num_rows, ids.size, int(ids[0]), int(ids[-1])) != (unit.rows, unit.tasks, unit.first_task,
                                                                      unit.last_task):
            raise DataError(f"stripe holds {batch.num_rows} rows / {ids.size} tasks ({ids[0]}..{ids[-1]}) but "
                            f"the plan ({INDEX_FILE}) says {unit.rows} / {unit.tasks} ({unit.first_task}.."
                            f"{unit.last_task}); the file changed after it was indexed",
                            file=unit.file, stripe=unit.stripe, column=self.schema.task_column)
        return block, stats

    def _blocks(self, executor: ThreadPoolExecutor, units) -> Iterator:
        """Decoded blocks of ``units`` in order, ``2 * num_parallel_reads`` stripes in flight."""
        cache = _OrcCache()
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

    def chunks(self, epoch: int = 0) -> Iterator[dict]:
        """This rank's epoch as numpy chunks of up to ``batches_per_chunk`` meta-batches each
        (the interface dict with a leading [B] axis); together exactly ``steps_per_epoch``.

        Stripe decoding and chunk assembly both run on the thread pool (numpy and pyarrow
        release the GIL), so they overlap with each other and with tf.data's own work.
        """
        executor = ThreadPoolExecutor(self.num_parallel_reads, thread_name_prefix="gmeta-io")
        ahead = deque()
        try:
            for pool, sel, n_batches in self._chunk_plan(epoch, executor):
                ahead.append((executor.submit(gather_tasks, pool, sel, n_batches, self.T, self.S, self.Q,
                                              self._layout), n_batches, sel.size))
                if len(ahead) > 2 * self.num_parallel_reads:
                    yield self._collect(*ahead.popleft())
            while ahead:
                yield self._collect(*ahead.popleft())
        except DataError as exc:
            self.error = exc
            raise
        finally:
            for f, _, _ in ahead:
                f.cancel()
            executor.shutdown(wait=True, cancel_futures=True)

    def _collect(self, future, n_batches: int, real_tasks: int) -> dict:
        chunk = future.result()
        self.stats["batches"] += n_batches
        self.stats["padding_tasks"] += n_batches * self.T - real_tasks
        return chunk

    def _chunk_plan(self, epoch: int, executor: ThreadPoolExecutor) -> Iterator[tuple]:
        """``(pool block, task indices, batches)`` per chunk: read blocks into a shuffle pool,
        cut it into chunks of whole batches (the remainder waits for the next blocks), pad the
        last batch, then add padding-only batches up to ``steps_per_epoch``."""
        rng = self._rng(epoch, 1)
        chunk = self.batches_per_chunk * self.T
        buffer = max(self.shuffle_buffer_tasks, chunk) if self.shuffle else chunk
        parts, held, emitted = [], 0, 0
        for block, stats in self._blocks(executor, self.unit_order(epoch)):
            for k, v in stats.items():
                self.stats[k] += v
            parts.append(block)
            held += block.tasks
            if held >= buffer:
                pool = _Block.concat(parts)
                order = rng.permutation(pool.tasks) if self.shuffle else np.arange(pool.tasks)
                cut = pool.tasks - pool.tasks % chunk
                for lo in range(0, cut, chunk):
                    emitted += self.batches_per_chunk
                    yield pool, order[lo:lo + chunk], self.batches_per_chunk
                parts = [compact(pool, order[cut:])] if cut < pool.tasks else []
                held = pool.tasks - cut
        if parts:
            pool = _Block.concat(parts)
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
                yield _index_nested(chunk, b)

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

    def dataset(self, epoch: int = 0):
        """A ``tf.data.Dataset`` of exactly ``steps_per_epoch`` meta-batches (static shapes).

        The generator hands over chunks of ``batches_per_chunk`` meta-batches (one Python call
        and one conversion per feature per chunk, not per batch); ``unbatch`` splits them.
        A DataError met while reading surfaces from the iterator as a TensorFlow error whose
        message carries the DataError text; it is also kept in ``reader.error``.
        """
        import tensorflow as tf

        ds = tf.data.Dataset.from_generator(lambda: self.chunks(epoch),
                                            output_signature=self.element_spec(leading=(None,)))
        ds = ds.unbatch()
        ds = ds.apply(tf.data.experimental.assert_cardinality(self.steps_per_epoch))
        if self.prefetch:
            ds = ds.prefetch(self.prefetch)
        return ds


def _index_nested(d: dict, b: int) -> dict:
    return {k: (_index_nested(v, b) if isinstance(v, dict) else v[b]) for k, v in d.items()}
