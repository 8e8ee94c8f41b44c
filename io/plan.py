"""What a split holds, from metadata and narrow column reads: units of work and their assignment to
ranks, per-task sizes, and whole-split reads of a few columns. Pure Python / numpy / pyarrow.

Units ``(file, stripe)`` come from ``_index.json`` when it still describes the files present,
else from scanning each stripe's task and flag columns; both give the same list, so every rank
computes the same plan without a collective. ``shard_tasks`` then gives each rank a contiguous
range of the split's tasks (in file order), cut below the stripe where needed, so task counts
differ by at most one across ranks however few stripes the split has.
``task_sizes``, ``distinct_values`` and ``read_columns`` answer questions about a whole split
(cap choice, which ids were seen, baselines) without going through meta-batches, which drop
rows past the S/Q caps.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import pyarrow as pa

from gmeta.io import fs
from gmeta.io.errors import DataError
from gmeta.io.index import INDEX_FILE, load_index, scan_file
from gmeta.io.schema import SCHEMA_FILE, Schema, SchemaError
from gmeta.io.stripes import iter_stripes, list_orc_files, orc_paths
from gmeta.io.validate import check_no_nulls, check_tasks_disjoint


@dataclass(frozen=True)
class Unit:
    """One stripe of one file (the unit of parallel reading), or a rank's share of it: tasks
    ``[lo, hi)`` in the stripe's order (``hi`` None: to the end). ``rows``, ``tasks``,
    ``first_task`` and ``last_task`` always describe the whole stripe (to check the file)."""

    file: str
    stripe: int
    rows: int
    tasks: int
    first_task: int
    last_task: int
    lo: int = 0
    hi: Optional[int] = None

    @property
    def share(self) -> int:
        """How many of the stripe's tasks this unit stands for."""
        return (self.tasks if self.hi is None else self.hi) - self.lo

    @property
    def whole(self) -> bool:
        return self.lo == 0 and (self.hi is None or self.hi == self.tasks)


def load_schema(dataset_dir: str) -> Schema:
    """``DIR/schema.json``; any problem with it is a DataError."""
    try:
        return Schema.load(dataset_dir)
    except SchemaError as exc:
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"cannot read schema.json: {exc}", file=fs.join(dataset_dir, SCHEMA_FILE)) from None


def split_stripes(split_dir: str, schema: Schema, use_index: bool = True, threads: int = 2,
                  require=()) -> list:
    """``(file, stripe, index entry)`` of every stripe of a split, in file order.

    From ``_index.json`` if it matches the files and every stripe entry has the keys in
    ``require``; else by scanning all files (``threads`` at a time). Either way a task found in
    two stripes is a DataError.
    """
    files = list_orc_files(split_dir)
    index = load_index(split_dir, files) if use_index else None
    if index is not None and all(k in s for f in index["files"] for s in f["stripes"] for k in require):
        found = [(fs.join(split_dir, f["name"]), i, s) for f in index["files"] for i, s in enumerate(f["stripes"])]
        for (fa, ia, a), (fb, ib, b) in zip(found, found[1:]):  # the writer orders tasks within a file
            if a["last_task"] == b["first_task"]:
                raise DataError(f"task {a['last_task']} is split across stripes: it also has rows in {fa} "
                                f"stripe {ia}", file=fb, stripe=ib, column=schema.task_column)
        return found
    paths = [fs.join(split_dir, e.base_name) for e in files]
    with ThreadPoolExecutor(threads) as pool:
        scanned = list(pool.map(lambda p: scan_file(p, schema), paths))
    found = [(p, i, e) for p, (entries, _) in zip(paths, scanned) for i, e in enumerate(entries)]
    check_tasks_disjoint([ids for _, per_stripe in scanned for ids in per_stripe],
                         [(p, i) for p, i, _ in found], schema.task_column)
    return found


def plan_units(split_dir: str, schema: Schema, use_index: bool = True, threads: int = 2) -> list:
    """The split's units, in file order (see ``split_stripes``)."""
    return [Unit(p, i, e["rows"], e["tasks"], e["first_task"], e["last_task"])
            for p, i, e in split_stripes(split_dir, schema, use_index, threads)]


def shard_tasks(units, world_size: int) -> list:
    """Units per rank: rank r gets the split's tasks ``[r N / W, (r+1) N / W)`` in file order, so
    counts differ by at most one. A stripe that straddles a boundary is shared: each rank gets a
    ``Unit`` for its task range of it (and decodes the stripe, keeping only that range). Pure
    arithmetic on the plan, so every rank computes the same assignment."""
    total = sum(u.tasks for u in units)
    bounds = [r * total // world_size for r in range(world_size + 1)]
    shares = [[] for _ in range(world_size)]
    offset = 0
    for u in units:
        lo, hi = offset, offset + u.tasks
        for r in range(world_size):
            a, b = max(lo, bounds[r]), min(hi, bounds[r + 1])
            if a < b:
                shares[r].append(u if (a, b) == (lo, hi) else replace(u, lo=a - lo, hi=b - lo))
        offset = hi
    return shares


def task_sizes(dataset_dir: str, split: str, use_index: bool = True):
    """``(support_counts, query_counts)``, int64, one entry per task of the split: its support
    and query row counts before any cap. Tasks come stripe by stripe in file order and, within a
    stripe, ordered by (support, query) (the index keeps a histogram, not task ids).

    Read from ``_index.json``'s ``task_sizes``; an index without it (older datasets), a stale one
    or none at all makes it scan the task and flag columns instead.
    """
    schema = load_schema(dataset_dir)
    stripes = split_stripes(fs.join(dataset_dir, split), schema, use_index, require=("task_sizes",))
    hist = np.concatenate([_histogram(p, i, e) for p, i, e in stripes])
    return np.repeat(hist[:, 0], hist[:, 2]), np.repeat(hist[:, 1], hist[:, 2])


def _histogram(path: str, stripe: int, entry: dict) -> np.ndarray:
    """A stripe's ``task_sizes`` as an int64 [k, 3] array, checked against its task count."""
    try:
        hist = np.asarray(entry["task_sizes"], np.int64).reshape(-1, 3)
        ok = hist.size == 0 or (hist.min() >= 0 and int(hist[:, 2].sum()) == entry["tasks"])
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{INDEX_FILE}: task_sizes of this stripe is malformed or disagrees with its "
                        f"{entry.get('tasks')} tasks; rewrite the index or delete it to scan", file=path,
                        stripe=stripe)
    return hist


def distinct_values(dataset_dir: str, split: str, column: str) -> np.ndarray:
    """Sorted distinct non-negative values (int64) of an int64 or list<int64> column over every
    row of a split: e.g. exactly which item ids occur, including rows that batches drop past the
    caps. Raw stored values (a hashed table's ids are not reduced modulo its size)."""
    def check(file_schema, path):
        _check_type(file_schema, path, column, _is_id_type, "int64 or list<int64>")

    parts, held = [], 0
    for path, i, batch in iter_stripes(orc_paths(fs.join(dataset_dir, split)), [column], check):
        arr = batch.column(0)
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            check_no_nulls({column: arr}, path, i)
            arr = arr.flatten()
        check_no_nulls({column: arr}, path, i)
        values = arr.to_numpy()
        parts.append(np.unique(values[values >= 0]))
        held += parts[-1].size
        if held > (1 << 22):  # bound memory by the distinct count, not the row count
            parts = [np.unique(np.concatenate(parts))]
            held = parts[0].size
    return np.unique(np.concatenate(parts)).astype(np.int64, copy=False)


def read_columns(dataset_dir: str, split: str, columns) -> dict:
    """``{name: numpy array}`` of single-valued numeric columns, every row of the split in file
    order (for baselines that need all rows, such as item popularity)."""
    names = [columns] if isinstance(columns, str) else list(dict.fromkeys(columns))
    paths = orc_paths(fs.join(dataset_dir, split))
    if not names:
        return {}

    def check(file_schema, path):
        for name in names:
            _check_type(file_schema, path, name, _is_number_type, "a single-valued numeric type")

    parts = {name: [] for name in names}
    for path, i, batch in iter_stripes(paths, names, check):
        for name in names:
            arr = batch.column(name)
            check_no_nulls({name: arr}, path, i)
            parts[name].append(arr.to_numpy())
    return {name: np.concatenate(p) for name, p in parts.items()}


def first_values_by_key(dataset_dir: str, splits, key: str, columns, max_lens: dict) -> tuple:
    """``(keys, {column: values})``: each distinct id of the ``key`` column (sorted) with the
    values ``columns`` had on its first row (splits in the order given, rows in file order);
    list columns as ``[n, max_lens[c]]`` int64 padded with -1. What a model that generates an
    item's embedding from its side features needs for items it has not seen."""
    names = list(dict.fromkeys([key, *columns]))
    keys, parts = [], {c: [] for c in columns}
    for split in splits:
        for path, _, batch in iter_stripes(orc_paths(fs.join(dataset_dir, split)), names, lambda *a: None):
            check_no_nulls({key: batch.column(key)}, path, 0)
            keys.append(batch.column(key).to_numpy())
            for c in columns:
                col = batch.column(c)
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    width = max_lens[c]
                    lengths = np.minimum(col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), width)
                    flat = col.flatten().to_numpy(zero_copy_only=False)
                    offsets = col.offsets.to_numpy()
                    starts = offsets[:-1] - offsets[0]
                    out = np.full((len(col), width), -1, np.int64)
                    row, pos = np.nonzero(np.arange(width)[None, :] < lengths[:, None])
                    out[row, pos] = flat[starts[row] + pos]
                    parts[c].append(out)
                else:
                    parts[c].append(col.to_numpy(zero_copy_only=False))
    if not keys:
        return np.zeros(0, np.int64), {c: np.zeros(0) for c in columns}
    all_keys = np.concatenate(keys)
    uniq, first = np.unique(all_keys, return_index=True)
    return uniq.astype(np.int64), {c: np.concatenate(p)[first] for c, p in parts.items()}


def _is_id_type(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return t == pa.int64()


def _is_number_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _check_type(file_schema: pa.Schema, path: str, name: str, ok, wanted: str) -> None:
    idx = file_schema.get_field_index(name)
    if idx < 0:
        raise DataError(f"column is missing (the file has {file_schema.names})", file=path, column=name)
    got = file_schema.field(idx).type
    if not ok(got):
        raise DataError(f"type {got} is not {wanted}", file=path, column=name)
