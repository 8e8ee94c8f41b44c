"""``gmeta predict``: adapt to each task's support rows and score its query rows, from a file.

    gmeta predict --model models:/melu@champion --input rows.parquet --out scored.parquet
    gmeta predict --model runs/<run id>/model --input data/synth/user_cold --out scored.csv

The input is a Parquet, ORC or CSV file (or a directory of them, e.g. a dataset split) with the
dataset's columns: the task column, ``is_query`` (0 support, 1 query), the labels the inner
loop needs on support rows, and the model's features (list features as list columns; in CSV as
ids joined by ``|``): the team's raw ids for a feature whose table has a vocabulary (an unseen
id is scored on the out-of-vocabulary row), table rows for any other. A column the model cannot
use stops it with one line naming the column and what to send (``runtime.InputError``). The
output holds the same rows in the same order with ``score_adapted`` and ``score_unadapted`` (and
``score_<head>_...`` per extra head) filled on query rows and empty on support rows, written as
Parquet, ORC or CSV by the extension of ``--out``.

Scoring runs through the export's SavedModel (``gmeta.trainer.serving.savedmodel``; built on the fly
into a temporary directory when the export has none) with ``gmeta.trainer.serving.runtime``'s runtime:
rows are grouped into tasks with numpy (no Python loop over rows) and ``--tasks-per-call``
tasks go through the SavedModel per call.

``write_eval_predictions`` is ``gmeta evaluate --predictions-out``: one row per evaluated query
row (split, task, item, label, adapted and unadapted score per head).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.orc as orc
import pyarrow.parquet as pq

from gmeta.trainer.evaluation.rows import SCORES, heads_of, label_key, score_key
from gmeta.trainer.parallel.launch import run_guarded
from gmeta.trainer.serving.runtime import InputError, ServingRuntime
from gmeta.trainer.serving.savedmodel import DEFAULT_MAX_TABLE_BYTES, output_name, saved_model_of, write_saved_model
from gmeta.trainer.tracking.mlflow_run import add_tracking_arguments, resolve_export_dir

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".orc": "orc", ".csv": "csv"}
LIST_SEPARATOR = "|"


@dataclass(frozen=True)
class PredictConfig:
    model: str
    input: str
    out: str
    tracking_uri: str = "sqlite:///mlflow.db"
    steps: int = -1
    max_support: int = -1
    tasks_per_call: int = 256
    max_serving_table_bytes: int = DEFAULT_MAX_TABLE_BYTES


def add_arguments(p) -> None:
    p.add_argument("--model", required=True,
                   help="a gmeta export directory, a models:/ or runs:/ URI, or an MLflow run id")
    p.add_argument("--input", required=True, help="Parquet, ORC or CSV file, or a directory of them")
    p.add_argument("--out", required=True, help="output file: .parquet, .orc or .csv")
    add_tracking_arguments(p)
    p.add_argument("--steps", type=int, default=-1, help="inner steps (-1: the value the model was trained with)")
    p.add_argument("--max-support", type=int, default=-1,
                   help="support rows per task used, first in input order (-1: the trained support size, "
                        "as gmeta evaluate; 0: all)")
    p.add_argument("--tasks-per-call", type=int, default=256, help="tasks per SavedModel call")
    p.add_argument("--max-serving-table-bytes", type=int, default=DEFAULT_MAX_TABLE_BYTES,
                   help="when the export has no SavedModel: refuse to build one whose embedding tables "
                        "exceed this many bytes (they are held whole in memory)")


def main(args) -> int:
    cfg = PredictConfig(model=args.model, input=args.input, out=args.out, tracking_uri=args.tracking_uri,
                        steps=args.steps, max_support=args.max_support, tasks_per_call=args.tasks_per_call,
                        max_serving_table_bytes=args.max_serving_table_bytes)
    return run_guarded(lambda: predict(cfg) and 0)


def predict(cfg: PredictConfig) -> dict:
    if cfg.tasks_per_call < 1:
        raise ValueError("--tasks-per-call must be >= 1")
    out_format = _format(cfg.out)
    t0 = time.time()
    export_dir = resolve_export_dir(cfg.model, cfg.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="gmeta-predict-") as tmp:
        saved = saved_model_of(export_dir)
        if saved is None:
            _log(f"{export_dir} has no SavedModel; building one in a temporary directory")
            saved = write_saved_model(export_dir, os.path.join(tmp, "saved_model"),
                                      max_table_bytes=cfg.max_serving_table_bytes)
        runtime = ServingRuntime(saved, tasks_per_call=cfg.tasks_per_call)
        table = read_table(cfg.input, text_columns(runtime))
        cols = columns_from_arrow(table, runtime)
        t1 = time.time()
        scores = runtime.score(cols, steps=None if cfg.steps < 0 else cfg.steps,
                               max_support=None if cfg.max_support < 0 else cfg.max_support)
        seconds = time.time() - t1
    for name in runtime.output_columns:
        values = scores[name]
        table = table.append_column(name, pa.array(values, pa.float32(), mask=np.isnan(values)))
    write_table(table, cfg.out, out_format)
    query = cols[runtime.query_column] != 0
    summary = {"rows": int(table.num_rows), "query_rows": int(query.sum()),
               "tasks": int(np.unique(cols[runtime.task_column][query]).size),
               "steps": runtime.steps if cfg.steps < 0 else cfg.steps, "out": cfg.out,
               "scoring_seconds": round(seconds, 3), "seconds": round(time.time() - t0, 3)}
    _log(f"scored {summary['query_rows']} query rows of {summary['tasks']} tasks in {seconds:.2f} s "
         f"-> {cfg.out}")
    print(json.dumps(summary, sort_keys=True), flush=True)
    return summary


def _log(message: str) -> None:
    print(f"[gmeta] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- files
def _format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path}: unknown format {ext!r}; use one of {sorted(FORMATS)}")
    return FORMATS[ext]


def text_columns(runtime) -> list:
    """Columns CSV must read as text: lists (ids joined by "|") and string raw ids (which CSV
    would read as numbers when they look like numbers)."""
    return [n for n, max_len in runtime.sparse.items() if max_len > 1 or runtime.raw_kind(n) == "string"]


def read_table(path: str, text=()):
    """A Parquet/ORC/CSV file, or every such file of a directory (sorted by name), as one table;
    ``text``: columns a CSV file holds as text."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.splitext(f)[1].lower() in FORMATS)
        if not files:
            raise FileNotFoundError(f"{path}: no {sorted(FORMATS)} files in this directory")
        return pa.concat_tables([read_table(f, text) for f in files])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    fmt = _format(path)
    if fmt == "parquet":
        return pq.read_table(path)
    if fmt == "orc":
        return orc.read_table(path)
    return csv.read_csv(path, convert_options=csv.ConvertOptions(column_types={n: pa.string() for n in text}))


def write_table(table, path: str, fmt: str | None = None) -> None:
    fmt = fmt or _format(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "orc":
        orc.write_table(table, path)
    else:
        for i, field in enumerate(table.schema):  # CSV has no lists: ids joined by "|"
            if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
                joined = pc.binary_join(table.column(i).cast(pa.list_(pa.string())), LIST_SEPARATOR)
                table = table.set_column(i, field.name, joined)
        csv.write_csv(table, path)


def columns_from_arrow(table, runtime) -> dict:
    """An Arrow table -> ``ServingRuntime.score``'s columns, vectorized (no Python loop over rows);
    the runtime checks every id column (``ids`` / ``id_lists``), as it does for the MLflow model."""
    runtime.check_columns(table.column_names)

    def ints(name):
        col = table.column(name)
        if col.null_count:
            raise InputError(f"column {name!r} has {col.null_count} empty values")
        return col.cast(pa.int64()).to_numpy()

    cols = {runtime.task_column: ints(runtime.task_column), runtime.query_column: ints(runtime.query_column)}
    for name, max_len in runtime.sparse.items():
        if max_len == 1:
            cols[name] = runtime.ids(name, _numpy(table.column(name)))
        else:
            cols[name] = runtime.id_lists(name, *_flat_lists(table, name))
    for name in runtime.dense + [lab for lab in runtime.labels if lab in table.column_names]:
        col = pc.fill_null(table.column(name).cast(pa.float32()), float("nan"))
        cols[name] = col.to_numpy().astype(np.float32)
    return cols


def _numpy(col) -> np.ndarray:
    """A column's values as numpy (strings as objects, nulls as None or NaN)."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.to_numpy(zero_copy_only=False)


def _flat_lists(table, name: str) -> tuple:
    """A list column (in CSV: ids joined by "|") -> (every id in order, each row's count)."""
    col = table.column(name).combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.int64()))
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = pc.split_pattern(pc.if_else(pc.equal(col, ""), pa.scalar(None, col.type), col), LIST_SEPARATOR)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise InputError(f"column {name!r}: expected a list of ids in every row, got {col.type}")
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    return _numpy(pc.list_flatten(col)), lengths


# ----------------------------------------------------------------------------- gmeta evaluate
def write_eval_predictions(rows_by_split: dict, path: str, log=None) -> int:
    """``gmeta evaluate --predictions-out``: one row per evaluated query row, in reader order:
    ``split``, ``task``, ``query_position`` (the row's place among its task's query rows),
    ``item`` (single-valued item feature), ``label`` and ``score_adapted`` / ``score_unadapted``
    (and ``label_<head>``, ``score_<head>_adapted`` / ``_unadapted`` per extra head), from the
    rows the evaluation already gathered (``evaluate_splits(..., rows_out=)``)."""
    columns = {}
    for split, out in rows_by_split.items():
        if not out:
            continue
        rows = {"split": np.full(out["task"].size, split, object), "task": out["task"],
                "query_position": out["query_position"]}
        if "item" in out:
            rows["item"] = out["item"]
        heads = heads_of(out)
        for i, head in enumerate(heads):
            name = output_name(head, i == 0)
            rows["label" if i == 0 else f"label{name[len('score'):]}"] = out[label_key(head)]
            for scorer in SCORES:
                rows[f"{name}_{scorer}"] = out[score_key(head, scorer)]
        for k, v in rows.items():
            columns.setdefault(k, []).append(v)
    table = pa.table({k: pa.array(np.concatenate(v)) for k, v in columns.items()}) if columns else pa.table({})
    write_table(table, path)
    if log:
        log(f"wrote {table.num_rows} query-row predictions to {path}")
    return table.num_rows
