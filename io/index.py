"""A split's ``_index.json``: what it records per stripe, the one stripe scanner that computes it
from the data, and loading it back only while it still describes the files present.

Per stripe the index holds rows, tasks, first/last task id, support/query row totals and
maxima, and ``task_sizes``: the joint histogram ``[[support rows, query rows, tasks], ...]``
(sorted), so per-task sizes are known without reading data and the index stays small (a
stripe has far fewer distinct size pairs than tasks). Readers treat a missing ``task_sizes``
(indexes written before it existed) as "scan the files"; the format version is unchanged.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import numpy as np

from gmeta.io import fs
from gmeta.io.errors import DataError
from gmeta.io.schema import Schema
from gmeta.io.stripes import iter_stripes
from gmeta.io.validate import check_file_schema, check_no_nulls, check_query_flags, task_runs

log = logging.getLogger(__name__)

INDEX_FILE = "_index.json"
INDEX_FORMAT = "gmeta-meta-io-index"
INDEX_VERSION = 1


def summarize_stripe(task_ids: np.ndarray, flags: np.ndarray, file, stripe, task_column: str = "task_id",
                     query_column: str = "is_query"):
    """Check a stripe's task and flag columns; return (its ``_index.json`` entry, its task ids)."""
    starts, ids = task_runs(task_ids, file, stripe, task_column)
    check_query_flags(flags, file, stripe, query_column)
    n = int(task_ids.shape[0])
    if n == 0:
        raise DataError("stripe has no rows", file=file, stripe=stripe)
    lens = np.diff(np.append(starts, n))
    query = np.add.reduceat(flags.astype(np.int64), starts)
    support = lens - query
    pairs, counts = np.unique(np.stack([support, query], axis=1), axis=0, return_counts=True)
    entry = {"rows": n, "tasks": int(ids.size), "first_task": int(ids[0]), "last_task": int(ids[-1]),
             "support_rows": int(support.sum()), "query_rows": int(query.sum()),
             "max_support": int(support.max()), "max_query": int(query.max()),
             "task_sizes": np.column_stack([pairs, counts]).tolist()}
    return entry, ids


def scan_file(path: str, schema: Schema):
    """``(index entries, task ids)`` per stripe of one file, from its task and flag columns only.

    The one stripe scanner: the reader's plan when there is no usable index and the writer's
    read-back of each finished file both use it. Checks the file's schema, nulls, flags and that
    each task is one run inside its stripe (tasks spanning stripes are the caller's check, since
    it may span files).
    """
    cols = (schema.task_column, schema.query_column)
    entries, ids = [], []
    check = lambda file_schema, p: check_file_schema(file_schema, schema, p)  # noqa: E731
    for _, i, batch in iter_stripes([path], cols, check):
        task, flag = batch.column(cols[0]), batch.column(cols[1])
        check_no_nulls(dict(zip(cols, (task, flag))), path, i)
        entry, stripe_ids = summarize_stripe(task.to_numpy(), flag.to_numpy(), path, i, *cols)
        entries.append(entry)
        ids.append(stripe_ids)
    return entries, ids


def load_index(split_dir: str, files) -> Optional[dict]:
    """The writer's ``_index.json`` if it describes exactly ``files`` (``FileInfo``s), else None."""
    path = fs.join(split_dir, INDEX_FILE)
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


def index_text(index: dict) -> str:
    """``_index.json`` text: one line per stripe (its histogram inline), so a large split's
    index stays small and still reads line by line."""
    dump = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731
    files = []
    for f in index["files"]:
        head = dump({k: v for k, v in f.items() if k != "stripes"})[:-1]
        stripes = ",\n   ".join(dump(s) for s in f["stripes"])
        files.append(f'  {head}, "stripes": [\n   {stripes}]}}')
    top = dump({k: v for k, v in index.items() if k != "files"})[:-1]
    return f'{top},\n "files": [\n' + ",\n".join(files) + "]}\n"
