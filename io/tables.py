"""numpy columns -> the pyarrow Table a ``TaskWriter`` takes, for every producer of Meta-IO data
(the generator, the converters), so none of them re-derives the schema's column types."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def padded_to_list_array(mat: np.ndarray) -> pa.ListArray:
    """A [rows, L] -1-padded int matrix (valid entries first) -> pyarrow list<int64>."""
    valid = mat >= 0
    offsets = np.zeros(len(mat) + 1, np.int32)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(mat[valid].astype(np.int64)))


def arrow_table(schema, columns: dict) -> pa.Table:
    """A pyarrow Table with exactly the schema's columns, in canonical order and types. A list
    feature may be given as a -1-padded matrix or as a ready pyarrow list array."""
    list_features = {f.name for f in schema.sparse if f.is_list}
    int_columns = {schema.task_column} | {f.name for f in schema.sparse}
    arrays = []
    for name in schema.column_names():
        col = columns[name]
        if name in list_features:
            arrays.append(padded_to_list_array(col) if isinstance(col, np.ndarray) else col)
        elif name == schema.query_column:
            arrays.append(pa.array(np.asarray(col, np.int8)))
        elif name in int_columns:
            arrays.append(pa.array(np.asarray(col, np.int64)))
        else:
            arrays.append(pa.array(np.asarray(col, np.float32)))
    return pa.Table.from_arrays(arrays, names=schema.column_names())
