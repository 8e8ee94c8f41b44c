"""Meta-batch assembly in numpy (no TensorFlow): decoded stripes -> blocks of whole tasks ->
fixed-shape, padded meta-batches.

A block keeps rows row-major (one int64 and one float32 matrix, list features expanded to
``max_len`` columns) with one trailing padding row, and per task where its support and query
rows start and how many are used (capped at S / Q). A meta-batch is then, per side, the row
numbers of its [T, cap] slots (``batch_rows``: ``start + position``, or the padding row) and ONE
row gather per dtype, done by ``gather_packed`` in numpy or by the reader's tf.data pipeline in
TensorFlow. Everything is vectorized: run starts from ``np.not_equal``, per-task counts from
``np.add.reduceat``; no Python loop over rows or tasks. Row matrices are allocated 64-byte
aligned (``aligned_empty``), which lets TensorFlow take them over without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gmeta.io.errors import DataError
from gmeta.io.schema import Schema
from gmeta.io.validate import check_finite, check_id_values, check_labels, check_no_nulls, check_query_flags, task_runs

#: TensorFlow wraps a numpy buffer as a tensor without copying it only when the buffer is aligned
#: to this (its largest SIMD alignment); numpy's own allocations are 16-byte aligned
ALIGN = 64

STAT_KEYS = ("rows_read", "tasks_read", "support_rows_dropped", "query_rows_dropped", "truncated_tasks",
             "list_values_dropped", "tasks_without_support", "tasks_without_query", "padding_tasks",
             "batches")


class Layout:
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


def aligned_empty(shape, dtype) -> np.ndarray:
    """``np.empty`` whose buffer starts on an ``ALIGN``-byte boundary (see ``ALIGN``)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


def aligned_take(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``a[rows]`` (rows of a matrix) into an aligned buffer."""
    return np.take(a, rows, axis=0, out=aligned_empty((rows.size,) + a.shape[1:], a.dtype))


def build_block(batch: pa.RecordBatch, lay: Layout, S: int, Q: int, file: str, stripe: int):
    """One decoded stripe -> (a ``Block``, stats), validated. Vectorized over rows and tasks.

    Rows are stored row-major (``ints`` int64 [n + 1, int_width] with list features expanded to
    ``max_len`` columns padded with -1, ``flts`` float32 [n + 1, n_floats]); the extra last row
    holds the padding values, so a padded batch is ONE row gather per dtype. Within each task
    the support rows are made to precede the query rows (a stable reorder, skipped when the file
    already has that order), so each side of a task is the row range ``[start, start + count)``;
    counts are capped at S / Q (rows past the cap are dropped and counted).
    """
    cols = {name: batch.column(name) for name in lay.columns}
    check_no_nulls(cols, file, stripe)
    n = batch.num_rows
    if n == 0:
        raise DataError("stripe has no rows", file=file, stripe=stripe)
    task = cols[lay.task].to_numpy()
    starts, ids = task_runs(task, file, stripe, lay.task)
    flags = cols[lay.query].to_numpy()
    check_query_flags(flags, file, stripe, lay.query)

    # each column is checked as the contiguous array Arrow gives (a column of a row-major
    # matrix is strided, and numpy's reductions over one are several times slower)
    n_labels = len(lay.schema.labels)
    flts = aligned_empty((n + 1, len(lay.float_names)), np.float32)
    flts[n] = 0.0
    for k, name in enumerate(lay.float_names):
        col = cols[name].to_numpy()
        if k < lay.n_checked_floats:
            check_finite(col[:, None], [name], file, stripe)
        if k < n_labels:
            check_labels(col[:, None], [name], file, stripe)
        flts[:n, k] = col
    ints = aligned_empty((n + 1, lay.int_width), np.int64)
    ints[n] = -1
    for k, name in enumerate(lay.int_names):
        ints[:n, k] = check_id_values(cols[name].to_numpy(), name, int(lay.int_limits[k]), bool(lay.int_hashed[k]),
                                      file, stripe, position="row")
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
        ints[:n, off:off + f.max_len] = -1
        ints[np.repeat(np.arange(n), lengths)[ok], off + in_list[ok]] = values[ok]  # the pad row stays -1
        stats["list_values_dropped"] += int(values.size - np.count_nonzero(ok))

    lens = np.diff(np.append(starts, n))
    n_query = np.add.reduceat(flags, starts, dtype=np.int64)
    n_support = lens - n_query
    # a 1 -> 0 step inside a task means query rows come before support rows: reorder stably
    if n > 1 and np.any((flags[1:] < flags[:-1]) & (np.diff(task) == 0)):
        tix = np.zeros(n, np.int64)
        tix[starts[1:]] = 1
        np.cumsum(tix, out=tix)
        order = np.append(np.argsort(tix * 2 + flags, kind="stable"), n)  # the pad row stays last
        ints, flts = aligned_take(ints, order), aligned_take(flts, order)
    cnt_s, cnt_q = np.minimum(n_support, S), np.minimum(n_query, Q)
    stats["rows_read"], stats["tasks_read"] = n, int(ids.size)
    stats["support_rows_dropped"] = int(n_support.sum() - cnt_s.sum())
    stats["query_rows_dropped"] = int(n_query.sum() - cnt_q.sum())
    stats["truncated_tasks"] = int(np.count_nonzero((n_support > S) | (n_query > Q)))
    stats["tasks_without_support"] = int(np.count_nonzero(n_support == 0))
    stats["tasks_without_query"] = int(np.count_nonzero(n_query == 0))
    block = Block(ids, ints, flts, starts, cnt_s, starts + n_support, cnt_q)
    return block, stats


@dataclass
class Block:
    """Rows of whole tasks (row-major, plus one padding row at the end) and, per task, where
    each side's rows are."""

    task_id: np.ndarray   # [tasks] int64
    ints: np.ndarray      # [rows + 1, int_width] int64, last row -1
    flts: np.ndarray      # [rows + 1, n_floats] float32, last row 0
    start_s: np.ndarray   # [tasks] first support row
    cnt_s: np.ndarray     # [tasks] support rows used (<= S)
    start_q: np.ndarray
    cnt_q: np.ndarray

    @property
    def tasks(self) -> int:
        return self.task_id.size

    @property
    def rows(self) -> int:
        """Real rows; also the index of the padding row."""
        return self.ints.shape[0] - 1

    @staticmethod
    def concat(blocks: list) -> "Block":
        if len(blocks) == 1:
            return blocks[0]
        sizes = [b.rows for b in blocks]
        total = sum(sizes)
        ints = aligned_empty((total + 1, blocks[0].ints.shape[1]), np.int64)
        flts = aligned_empty((total + 1, blocks[0].flts.shape[1]), np.float32)
        at = 0
        for b in blocks:  # one copy per block (a handful per shuffle window), not per row or task
            ints[at:at + b.rows] = b.ints[:b.rows]
            flts[at:at + b.rows] = b.flts[:b.rows]
            at += b.rows
        ints[total], flts[total] = -1, 0.0
        shift = np.repeat(np.cumsum([0] + sizes[:-1]), [b.tasks for b in blocks])
        cat = np.concatenate
        return Block(cat([b.task_id for b in blocks]), ints, flts, cat([b.start_s for b in blocks]) + shift,
                     cat([b.cnt_s for b in blocks]), cat([b.start_q for b in blocks]) + shift,
                     cat([b.cnt_q for b in blocks]))


@dataclass
class BatchRows:
    """Where the slots of ``n`` meta-batches take their rows from in one pool block: row numbers
    (the pool's padding row for an unused slot), and the tasks. The gather itself is left to
    whoever holds the pool (numpy: ``gather_packed``; the reader's tf.data pipeline: TensorFlow)."""

    task_id: np.ndarray    # [n, T] int64, -1 for a padding task
    task_mask: np.ndarray  # [n, T] float32, 1 for a real task
    support: np.ndarray    # [n, T, S] int64 row numbers
    query: np.ndarray      # [n, T, Q]

    @property
    def batches(self) -> int:
        return self.task_id.shape[0]

    def __getitem__(self, b) -> "BatchRows":
        """Meta-batch ``b`` (or a range of them) of these."""
        return BatchRows(self.task_id[b], self.task_mask[b], self.support[b], self.query[b])


def batch_rows(pool: Block, sel: np.ndarray, n_batches: int, T: int, S: int, Q: int) -> BatchRows:
    """Tasks ``pool[sel]`` as ``n_batches`` meta-batches of T tasks (slots past ``len(sel)`` are
    padding tasks): slot [task, pos] of a side takes row ``start + pos`` while ``pos < count``,
    else the padding row (broadcast, no loop)."""
    k, slots = sel.size, n_batches * T
    task_id = np.full(slots, -1, np.int64)
    task_id[:k] = pool.task_id[sel]
    task_mask = np.zeros(slots, np.float32)
    task_mask[:k] = 1.0
    sides = []
    for start, cnt, cap in ((pool.start_s, pool.cnt_s, S), (pool.start_q, pool.cnt_q, Q)):
        lens = np.zeros((slots, 1), np.int64)
        lens[:k, 0] = cnt[sel]
        first = np.zeros((slots, 1), np.int64)
        first[:k, 0] = start[sel]
        pos = np.arange(cap)
        sides.append(np.where(pos < lens, first + pos, pool.rows).reshape(n_batches, T, cap))
    return BatchRows(task_id.reshape(n_batches, T), task_mask.reshape(n_batches, T), *sides)


def gather_packed(pool: Block, rows: BatchRows) -> dict:
    """The meta-batches of ``rows`` (a leading [n] axis), packed: per side one int64 array
    ``ints`` [n, T, cap, int_width] and one float32 array ``floats`` [n, T, cap, n_floats] (the
    ``Layout``'s columns), and the row ``mask`` [n, T, cap]. Few large arrays, so handing a batch
    to TensorFlow costs a few tensors, not one per feature (``unpack_columns`` / ``MetaReader.unpack``
    name them). The same arithmetic as the reader's TensorFlow gather."""
    out = {"task_id": rows.task_id, "task_mask": rows.task_mask}
    for side, idx in (("support", rows.support), ("query", rows.query)):
        out[side] = {"ints": pool.ints[idx], "floats": pool.flts[idx],
                     "mask": (idx != pool.rows).astype(np.float32)}
    return out


def unpack_columns(packed: dict, lay: Layout) -> dict:
    """Packed batches (``gather_packed``, or the reader's tensors) as the interface's nested dict:
    each feature is its column(s) of the last axis, by the same indexing on numpy arrays (views)
    and TensorFlow tensors (slices)."""
    out = {"task_id": packed["task_id"], "task_mask": packed["task_mask"]}
    for side in ("support", "query"):
        x_int, x_flt = packed[side]["ints"], packed[side]["floats"]
        d = {name: x_int[..., slot] for name, slot in lay.slots.items()}
        for j, name in enumerate(lay.float_names):
            d[name] = x_flt[..., j]
        d["mask"] = packed[side]["mask"]
        out[side] = d
    return out


def gather_tasks(pool: Block, sel: np.ndarray, n_batches: int, T: int, S: int, Q: int, lay: Layout) -> dict:
    """Tasks ``pool[sel]`` as ``n_batches`` meta-batches in the interface's nested dict, with a
    leading [n_batches] axis."""
    return unpack_columns(gather_packed(pool, batch_rows(pool, sel, n_batches, T, S, Q)), lay)


def compact(pool: Block, sel: np.ndarray) -> Block:
    """A new block holding only tasks ``pool[sel]`` (the remainder carried to the next cut)."""
    rows_s, excl_s = _ranges(pool.start_s[sel], pool.cnt_s[sel])
    rows_q, excl_q = _ranges(pool.start_q[sel], pool.cnt_q[sel])
    keep = np.concatenate([rows_s, rows_q, [pool.rows]])
    return Block(pool.task_id[sel], aligned_take(pool.ints, keep), aligned_take(pool.flts, keep), excl_s,
                 pool.cnt_s[sel], excl_q + rows_s.size, pool.cnt_q[sel])


def _ranges(starts: np.ndarray, lens: np.ndarray):
    """(row indices of the ranges [start, start+len) back to back, exclusive prefix sums of lens)."""
    excl = np.cumsum(lens) - lens
    total = int(excl[-1] + lens[-1]) if lens.size else 0
    return np.repeat(starts - excl, lens) + np.arange(total), excl


def empty_block(lay: Layout) -> Block:
    """A block of no tasks (only the padding row): the source of padding-only batches."""
    z = np.zeros(0, np.int64)
    ints = aligned_empty((1, lay.int_width), np.int64)
    ints[:] = -1
    flts = aligned_empty((1, len(lay.float_names)), np.float32)
    flts[:] = 0.0
    return Block(z, ints, flts, z, z, z, z)


def batch_of(chunk: dict, b: int) -> dict:
    """Meta-batch ``b`` of batches with a leading axis (the nested dict without that axis)."""
    return {k: (batch_of(v, b) if isinstance(v, dict) else v[b]) for k, v in chunk.items()}
