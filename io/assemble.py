"""Meta-batch assembly in numpy (no TensorFlow): decoded stripes -> blocks of whole tasks ->
fixed-shape, padded meta-batches.

A block keeps rows feature-major (one int64 and one float32 array, list features expanded to
``max_len`` rows) with one trailing padding column, and per task where its support and query
rows start and how many are used (capped at S / Q). A meta-batch is then ONE ``np.take`` per
dtype and side, with source columns made by broadcasting ``start + position`` (or the padding
column). Everything is vectorized: run starts from ``np.not_equal``, per-task counts from
``np.add.reduceat``; no Python loop over rows or tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gmeta.io.errors import DataError
from gmeta.io.schema import Schema
from gmeta.io.validate import (check_finite, check_id_values, check_ids, check_labels, check_no_nulls, check_query_flags,
                               task_runs)

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


def build_block(batch: pa.RecordBatch, lay: Layout, S: int, Q: int, file: str, stripe: int):
    """One decoded stripe -> (a ``Block``, stats), validated. Vectorized over rows and tasks.

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
    n_labels = len(lay.schema.labels)
    check_labels(flts[:n_labels, :n].T, lay.float_names[:n_labels], file, stripe)
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
    block = Block(ids, ints, flts, starts, cnt_s, starts + n_support, cnt_q)
    return block, stats


@dataclass
class Block:
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
    def concat(blocks: list) -> "Block":
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
        return Block(cat([b.task_id for b in blocks]), ints, flts, cat([b.start_s for b in blocks]) + shift,
                     cat([b.cnt_s for b in blocks]), cat([b.start_q for b in blocks]) + shift,
                     cat([b.cnt_q for b in blocks]))


def _ranges(starts: np.ndarray, lens: np.ndarray):
    """(row indices of the ranges [start, start+len) back to back, exclusive prefix sums of lens)."""
    excl = np.cumsum(lens) - lens
    total = int(excl[-1] + lens[-1]) if lens.size else 0
    return np.repeat(starts - excl, lens) + np.arange(total), excl


def gather_packed(pool: Block, sel: np.ndarray, n_batches: int, T: int, S: int, Q: int) -> dict:
    """Tasks ``pool[sel]`` as ``n_batches`` meta-batches of T tasks (slots past ``len(sel)`` are
    padding tasks), packed: per side one int64 array ``ints`` [int_width, n_batches, T, cap] and
    one float32 array ``floats`` [n_floats, n_batches, T, cap] (the ``Layout``'s rows), and the
    row ``mask`` [n_batches, T, cap]. Few large arrays, so handing a batch to TensorFlow costs a
    few tensors, not one per feature (``unpack_numpy`` / ``MetaReader.unpack`` name them).

    Every output position [task, pos] gets a source column by broadcasting (``start + pos`` while
    ``pos < count``, else the pad column), so each dtype of each side is one ``np.take``.
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
        src = np.where(real, first + pos, pool.rows).ravel()     # its row, or the pad column
        out[side] = {"ints": np.take(pool.ints, src, axis=1).reshape(-1, n_batches, T, cap),
                     "floats": np.take(pool.flts, src, axis=1).reshape(-1, n_batches, T, cap),
                     "mask": real.reshape(n_batches, T, cap).astype(np.float32)}
    return out


def unpack_numpy(packed: dict, lay: Layout) -> dict:
    """A packed chunk (``gather_packed``) as the interface's nested dict, features as views."""
    out = {"task_id": packed["task_id"], "task_mask": packed["task_mask"]}
    for side in ("support", "query"):
        x_int, x_flt = packed[side]["ints"], packed[side]["floats"]
        d = {}
        for name, slot in lay.slots.items():
            d[name] = np.moveaxis(x_int[slot], 0, -1) if isinstance(slot, slice) else x_int[slot]
        for j, name in enumerate(lay.float_names):
            d[name] = x_flt[j]
        d["mask"] = packed[side]["mask"]
        out[side] = d
    return out


def gather_tasks(pool: Block, sel: np.ndarray, n_batches: int, T: int, S: int, Q: int, lay: Layout) -> dict:
    """``gather_packed`` in the interface's nested dict with a leading [n_batches] axis."""
    return unpack_numpy(gather_packed(pool, sel, n_batches, T, S, Q), lay)


def compact(pool: Block, sel: np.ndarray) -> Block:
    """A new block holding only tasks ``pool[sel]`` (the remainder carried to the next cut)."""
    rows_s, excl_s = _ranges(pool.start_s[sel], pool.cnt_s[sel])
    rows_q, excl_q = _ranges(pool.start_q[sel], pool.cnt_q[sel])
    cols = np.concatenate([rows_s, rows_q, [pool.rows]])
    return Block(pool.task_id[sel], np.take(pool.ints, cols, axis=1), np.take(pool.flts, cols, axis=1), excl_s,
                 pool.cnt_s[sel], excl_q + rows_s.size, pool.cnt_q[sel])


def empty_block(lay: Layout) -> Block:
    """A block of no tasks (only the padding column): the source of padding-only batches."""
    z = np.zeros(0, np.int64)
    return Block(z, np.full((lay.int_width, 1), -1, np.int64), np.zeros((len(lay.float_names), 1), np.float32),
                 z, z, z, z)


def batch_of(chunk: dict, b: int) -> dict:
    """Meta-batch ``b`` of a chunk from ``gather_tasks`` (the nested dict without its leading axis)."""
    return {k: (batch_of(v, b) if isinstance(v, dict) else v[b]) for k, v in chunk.items()}
