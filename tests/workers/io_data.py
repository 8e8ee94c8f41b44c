"""Tiny Meta-IO datasets for the io tests (and the horovodrun io worker).

Every value is a function of (task, row position), so a test can recompute what the reader must
deliver: task t has 2 + t % 5 support rows and 1 + t % 3 query rows; ``item_id`` is
(7 t + pos) % 50, ``price`` is t + pos / 100, ``click`` is pos % 2, ``p_click`` is 0.5, and the
list feature ``tags`` holds pos % 4 values 11 t + j (the table is hashed with 7 buckets).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gmeta.io.schema import DenseFeature, Schema, SparseFeature, TableSpec
from gmeta.io.writer import TaskWriter, write_dataset_schema

USERS = 1000


def tiny_schema(splits=("train",)) -> Schema:
    return Schema(labels=("click",),
                  sparse=(SparseFeature("user_id", "user", group="user"),
                          SparseFeature("item_id", "item", group="item"),
                          SparseFeature("tags", "tag", max_len=3, group="item")),
                  dense=(DenseFeature("price", "item"),),
                  tables=(TableSpec("user", USERS), TableSpec("item", 50), TableSpec("tag", 7, hashed=True)),
                  oracle=("p_click",), item_id_feature="item_id", splits=tuple(splits))


def task_sizes(tasks):
    tasks = np.asarray(tasks, np.int64)
    return 2 + tasks % 5, 1 + tasks % 3


def make_columns(tasks, query_first: bool = False) -> dict:
    """Columns (numpy / pyarrow) of ``tasks`` in the given order, rows grouped by task."""
    tasks = np.asarray(tasks, np.int64)
    n_sup, n_qry = task_sizes(tasks)
    lens = n_sup + n_qry
    tid = np.repeat(tasks, lens)
    pos = np.arange(tid.size) - np.repeat(np.cumsum(lens) - lens, lens)
    is_query = (pos >= np.repeat(n_sup, lens)).astype(np.int8)
    if query_first:  # query rows first inside each task: the reader must still split them right
        is_query = (pos < np.repeat(n_qry, lens)).astype(np.int8)
    n_tags = pos % 4
    tag_values = np.repeat(tid * 11, n_tags) + (np.arange(n_tags.sum()) - np.repeat(np.cumsum(n_tags) - n_tags, n_tags))
    tags = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(n_tags)].astype(np.int32)),
                                    pa.array(tag_values, pa.int64()))
    return {"task_id": tid, "is_query": is_query, "click": (pos % 2).astype(np.float32), "user_id": tid,
            "item_id": (7 * tid + pos) % 50, "tags": tags, "price": (tid + pos / 100).astype(np.float32),
            "p_click": np.full(tid.size, 0.5, np.float32)}


def make_table(tasks, query_first: bool = False) -> pa.Table:
    cols = make_columns(tasks, query_first)
    return pa.table({name: cols[name] for name in tiny_schema().column_names()})


def write_tiny(directory, n_tasks: int = 60, rows_per_stripe: int = 40, rows_per_file: int = 120,
               tasks_per_write: int = 7, compression: str = "zstd", split: str = "train",
               first_task: int = 0) -> Schema:
    """A dataset of tasks first_task .. first_task + n_tasks - 1, several stripes and files."""
    schema = tiny_schema()
    with TaskWriter(str(directory), schema, split=split, rows_per_stripe=rows_per_stripe,
                    rows_per_file=rows_per_file, compression=compression) as w:
        for lo in range(first_task, first_task + n_tasks, tasks_per_write):
            w.write(make_table(np.arange(lo, min(lo + tasks_per_write, first_task + n_tasks))))
    write_dataset_schema(str(directory), schema)
    return schema


def expected_task(t: int, S: int, Q: int) -> dict:
    """What the reader must deliver for task ``t`` with caps S and Q (the reference, per task)."""
    cols = make_columns([t])
    q = cols["is_query"]
    tags = cols["tags"].to_pylist()
    out = {}
    for side, flag, cap in (("support", 0, S), ("query", 1, Q)):
        rows = np.flatnonzero(q == flag)[:cap]
        d = {"mask": np.zeros(cap, np.float32)}
        d["mask"][:rows.size] = 1
        for name, pad in (("user_id", -1), ("item_id", -1), ("click", 0), ("price", 0), ("p_click", 0)):
            v = np.full(cap, pad, cols[name].dtype if name not in ("user_id", "item_id") else np.int64)
            v[:rows.size] = cols[name][rows]
            d[name] = v
        t3 = np.full((cap, 3), -1, np.int64)
        for i, r in enumerate(rows):
            vals = [x % 7 for x in tags[r]][:3]
            t3[i, :len(vals)] = vals
        d["tags"] = t3
        out[side] = d
    return out
