"""Vectorized checks shared by the writer and the reader.

Each check is a handful of numpy reductions over whole columns (no Python loop over rows or
tasks); the slow path that finds the offending row only runs once a check has failed. Every
failure is a ``DataError`` naming the file (or writer call), stripe and column.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gmeta.io.errors import DataError
from gmeta.io.schema import EVENT_LABELS, Schema, id_rows

TASK_TYPE = pa.int64()
QUERY_TYPE = pa.int8()
FLOAT_TYPE = pa.float32()
ID_TYPE = pa.int64()
LIST_TYPE = pa.list_(pa.int64())


def column_types(schema: Schema) -> dict:
    """Column name -> the arrow type a Meta-IO file must store it as (canonical order)."""
    types = {schema.task_column: TASK_TYPE, schema.query_column: QUERY_TYPE}
    for name in schema.labels:
        types[name] = FLOAT_TYPE
    for f in schema.sparse:
        types[f.name] = LIST_TYPE if f.is_list else ID_TYPE
    for d in schema.dense:
        types[d.name] = FLOAT_TYPE
    for name in schema.oracle:
        types[name] = FLOAT_TYPE
    return types


def arrow_schema(schema: Schema) -> pa.Schema:
    """The exact arrow schema the writer produces for ``schema``."""
    return pa.schema([pa.field(n, t, nullable=True) for n, t in column_types(schema).items()])


def type_matches(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Equal types; lists match on their value type only (ORC readers name the child freely)."""
    if pa.types.is_list(expected):
        return ((pa.types.is_list(actual) or pa.types.is_large_list(actual))
                and actual.value_type == expected.value_type)
    return actual == expected


def check_file_schema(actual: pa.Schema, schema: Schema, file: str) -> None:
    """Every schema column present with its declared type; extra columns are ignored."""
    for name, expected in column_types(schema).items():
        idx = actual.get_field_index(name)
        if idx < 0:
            raise DataError(f"column is missing (the file has {actual.names}; schema.json wants "
                            f"{schema.column_names()})", file=file, column=name)
        got = actual.field(idx).type
        if not type_matches(got, expected):
            raise DataError(f"type {got} does not match schema.json, which implies {expected}",
                            file=file, column=name)


def check_no_nulls(columns: dict, file, stripe=None) -> None:
    """Meta-IO columns never hold nulls (a null id or label has no meaning)."""
    for name, arr in columns.items():
        if arr.null_count:
            raise DataError(f"{arr.null_count} null value(s); Meta-IO columns must be non-null",
                            file=file, stripe=stripe, column=name)


def task_runs(task_ids: np.ndarray, file, stripe=None, column: str = "task_id"):
    """(starts, run task ids) of the runs of equal task ids; each task must form ONE run.

    Also rejects negative task ids (-1 is the reader's padding task).
    """
    n = task_ids.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    boundary = np.empty(n, bool)
    boundary[0] = True
    np.not_equal(task_ids[1:], task_ids[:-1], out=boundary[1:])
    starts = np.flatnonzero(boundary)
    ids = task_ids[starts]
    if ids.min() < 0:
        row = int(np.flatnonzero(task_ids < 0)[0])
        raise DataError(f"negative task id {int(task_ids[row])} at row {row}",
                        file=file, stripe=stripe, column=column)
    if np.unique(ids).size != ids.size:
        uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
        dup = int(uniq[counts > 1][0])
        rows = starts[ids == dup][:2]
        raise DataError(f"task {dup} is not contiguous: its rows restart at row {int(rows[1])} after "
                        f"another task (first run starts at row {int(rows[0])}); rows of a task "
                        f"must be adjacent", file=file, stripe=stripe, column=column)
    return starts, ids


def check_query_flags(flags: np.ndarray, file, stripe=None, column: str = "is_query") -> None:
    """``is_query`` is 0 (support) or 1 (query)."""
    if flags.size and np.any(flags.view(np.uint8) > 1):
        row = int(np.flatnonzero(flags.view(np.uint8) > 1)[0])
        raise DataError(f"value {int(flags[row])} at row {row}; is_query must be 0 (support) or 1 (query)",
                        file=file, stripe=stripe, column=column)


def check_finite(mat: np.ndarray, names, file, stripe=None) -> None:
    """No NaN/inf in a [rows, len(names)] float matrix (labels and dense features)."""
    if mat.size == 0 or np.isfinite(mat).all():
        return
    row, col = (int(v) for v in np.argwhere(~np.isfinite(mat))[0])
    raise DataError(f"non-finite value {mat[row, col]} at row {row}; labels and dense features must be finite",
                    file=file, stripe=stripe, column=names[col])


def check_labels(mat: np.ndarray, names, file, stripe=None) -> None:
    """Event labels (click, conversion) in a [rows, len(names)] float matrix lie in [0, 1]: a
    click of 3.0 would otherwise train as an overconfident positive without a word."""
    cols = [k for k, name in enumerate(names) if name in EVENT_LABELS]
    if mat.size == 0 or not cols:
        return
    events = mat[:, cols]
    bad = (events < 0) | (events > 1)
    if not bad.any():
        return
    row, k = (int(v) for v in np.argwhere(bad)[0])
    raise DataError(f"value {events[row, k]:g} at row {row}; a {names[cols[k]]} label must be in [0, 1] "
                    f"(1: the event happened, 0: it did not; derive it from a rating with e.g. rating >= 4, "
                    f"or declare the column as a rating label)",
                    file=file, stripe=stripe, column=names[cols[k]])


def check_ids(mat: np.ndarray, names, limits: np.ndarray, hashed: np.ndarray, file, stripe=None,
              reduce_hashed: bool = True) -> None:
    """Sparse ids in a [rows, k] int64 matrix: >= 0, and < the table's num_rows unless hashed.

    With ``reduce_hashed`` (the reader), hashed columns are reduced modulo num_rows in place.
    """
    if mat.size == 0:
        return
    lo = mat.min(axis=0)
    if (lo < 0).any():
        col = int(np.flatnonzero(lo < 0)[0])
        row = int(np.flatnonzero(mat[:, col] < 0)[0])
        raise DataError(f"negative id {int(mat[row, col])} at row {row}", file=file, stripe=stripe,
                        column=names[col])
    hi = mat.max(axis=0)
    over = hi >= limits
    bad = over & ~hashed
    if bad.any():
        col = int(np.flatnonzero(bad)[0])
        row = int(np.flatnonzero(mat[:, col] >= limits[col])[0])
        raise DataError(f"id {int(mat[row, col])} at row {row} is >= the table's num_rows "
                        f"{int(limits[col])} (mark the table hashed in schema.json to take ids modulo "
                        f"num_rows)", file=file, stripe=stripe, column=names[col])
    for col in np.flatnonzero(over & hashed) if reduce_hashed else ():
        mat[:, col] = id_rows(mat[:, col], int(limits[col]), True)


def check_id_values(values: np.ndarray, name: str, limit: int, hashed: bool, file, stripe=None,
                    position: str = "list value") -> np.ndarray:
    """The flat values of a list<int64> feature (or one single-valued column, ``position="row"``);
    same rules as ``check_ids``. Returns the values (a new array reduced modulo ``limit`` if
    hashed; the input is not written)."""
    if values.size == 0:
        return values
    if values.min() < 0:
        pos = int(np.flatnonzero(values < 0)[0])
        raise DataError(f"negative id {int(values[pos])} at {position} {pos}", file=file, stripe=stripe,
                        column=name)
    if values.max() >= limit:
        if not hashed:
            pos = int(np.flatnonzero(values >= limit)[0])
            raise DataError(f"id {int(values[pos])} at {position} {pos} is >= the table's num_rows {limit} "
                            f"(mark the table hashed in schema.json to take ids modulo num_rows)",
                            file=file, stripe=stripe, column=name)
        values = id_rows(values, limit, True)
    return values


def check_tasks_disjoint(ids_per_unit: list, units: list, column: str = "task_id") -> None:
    """No task id in two units ``(file, stripe)``: a task must live inside one stripe of one file."""
    if not ids_per_unit:
        return
    ids = np.concatenate(ids_per_unit)
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size == ids.size:
        return
    dup = int(uniq[counts > 1][0])
    owner = np.repeat(np.arange(len(ids_per_unit)), [a.size for a in ids_per_unit])
    first, second = (units[k] for k in owner[ids == dup][:2])
    raise DataError(f"task {dup} is split across stripes: it also has rows in {first[0]} stripe {first[1]}; "
                    f"all rows of a task must be inside one stripe of one file (write datasets with "
                    f"gmeta.io.writer.TaskWriter)", file=second[0], stripe=second[1],
                    column=column)
