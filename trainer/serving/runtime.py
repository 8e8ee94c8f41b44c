"""Scoring cold users with the SavedModel: rows in, adapted and unadapted scores per query row out.

Standalone on purpose: this file imports numpy, TensorFlow and (for DataFrames) pandas, never
gmeta or Horovod. It ships inside the MLflow model (an artifact the pyfunc loads by path) and
runs under ``mlflow models serve`` in a plain environment; ``gmeta predict`` uses the same code.

Rows look like the dataset's: the task column (``task_id``), the role column (``is_query``: 0
support, 1 query), the labels the inner loop needs on support rows (``click``, ...; ignored on
query rows), and the model's features (dense float; sparse ids, list features as lists). A
feature whose table has a vocabulary takes the team's raw ids (strings or integers, the
vocabulary's kind; an id it never saw is scored on the out-of-vocabulary row); any other takes
table rows (int64, ``>= 0``, below the table's size unless it is hashed; a list may be padded
with -1). Rows the model cannot score raise ``InputError`` naming the column and what to send
(the MLflow model answers it with HTTP 400). ``ServingRuntime.score`` groups the rows by task without
a Python loop over rows, packs up to ``tasks_per_call`` tasks into one padded call of the
SavedModel's ``adapt_and_predict`` signature (support rows in input order, capped like the
evaluation reader at the trained support size), and returns per row the adapted and the
unadapted score of every head (NaN on support rows).
"""

from __future__ import annotations

import json
import os
from itertools import chain

import numpy as np

SERVING_META = "gmeta_serving.json"
ROW_COLUMN = "row"
OUTPUT_KINDS = ("adapted", "unadapted")
#: padding of raw-id inputs of the SavedModel (list features, padded rows): no id, a zero vector
#: like the -1 of row inputs (so the empty string is no string id: the runtime refuses it)
RAW_PAD = {"string": "", "int": -2 ** 63}
ROW_PAD = -1
#: what a column holds, as the error messages say it
HOLDS = {"int": "integers", "string": "strings", "float": "numbers with a fraction", "bool": "booleans",
         "mixed-integer": "integers mixed with other values", "mixed": "values of mixed types"}
KIND_WORDS = {"int": "integer", "string": "string"}


class InputError(ValueError):
    """Rows the model cannot score; the message names the column and what to send instead."""


def output_column(output: str, kind: str) -> str:
    """The column of one SavedModel output (``score``, ``score_<head>``) after adapting or
    before (``kind``); the SavedModel's output names and the runtime's columns are these."""
    return f"{output}_{kind}"


def output_columns(outputs) -> list:
    """Every output's adapted and unadapted column, in the order ``score`` returns them."""
    return [output_column(o, kind) for o in outputs for kind in OUTPUT_KINDS]


class ServingRuntime:
    """A loaded gmeta SavedModel plus what packing rows into tasks needs (``gmeta_serving.json``)."""

    def __init__(self, saved_model_dir: str, tasks_per_call: int = 256):
        import tensorflow as tf

        path = os.path.join(saved_model_dir, SERVING_META)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{saved_model_dir}: not a gmeta SavedModel (no {SERVING_META})")
        with open(path) as f:
            self.meta = json.load(f)
        self._tf = tf
        self._loaded = tf.saved_model.load(saved_model_dir)
        self._adapt = self._loaded.signatures["adapt_and_predict"]
        self._adapt_steps = self._loaded.signatures["adapt_and_predict_steps"]
        self.tasks_per_call = int(tasks_per_call)
        self.task_column = self.meta["task_column"]
        self.query_column = self.meta["query_column"]
        self.sparse = {f["name"]: int(f["max_len"]) for f in self.meta["sparse"]}
        self.id_specs = {f["name"]: f for f in self.meta["sparse"]}
        self.dense = list(self.meta["dense"])
        self.labels = list(self.meta["labels"])
        self.output_columns = output_columns(self.meta["outputs"])

    # ------------------------------------------------------------------ what goes in
    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    def feature_columns(self) -> list:
        return list(self.sparse) + self.dense

    def input_columns(self) -> list:
        return [self.task_column, self.query_column] + self.labels + self.feature_columns()

    def columns_from_frame(self, frame) -> dict:
        """A pandas DataFrame -> the numpy columns ``score`` takes (list cells: lists or arrays)."""
        self.check_columns(frame.columns)
        cols = {self.task_column: _ints(frame[self.task_column], self.task_column),
                self.query_column: _ints(frame[self.query_column], self.query_column)}
        for name, max_len in self.sparse.items():
            if max_len > 1:
                cols[name] = self.id_lists(name, *_flatten(frame[name]))
            else:
                cols[name] = self.ids(name, frame[name].to_numpy())
        for name in self.dense + [lab for lab in self.labels if lab in frame.columns]:
            cols[name] = _floats(frame[name], name)
        return cols

    def check_columns(self, names) -> None:
        """``InputError`` naming the columns a model input lacks."""
        missing = [c for c in [self.task_column, self.query_column] + self.feature_columns() if c not in names]
        if missing:
            raise InputError(f"input is missing columns {missing}; expected {self.input_columns()}")

    # ------------------------------------------------------------------ ids
    def raw_kind(self, name: str) -> str | None:
        """``string`` / ``int`` for a feature that takes raw ids (its vocabulary's kind), else None."""
        vocab = self.id_specs[name].get("vocabulary")
        return vocab["kind"] if vocab else None

    def pad(self, name: str):
        """The padding of a sparse input: ``RAW_PAD`` of its vocabulary's kind, or -1 for rows."""
        vocab = self.id_specs[name].get("vocabulary")
        return vocab["pad"] if vocab else ROW_PAD

    def ids(self, name: str, values) -> np.ndarray:
        """One id per row (any array) -> what the SavedModel takes: raw ids of the vocabulary's
        kind, or checked table rows; ``InputError`` otherwise."""
        return self._checked(name, np.asarray(values), padded=False)

    def id_lists(self, name: str, flat, lengths) -> np.ndarray:
        """A list feature given as its ids one after the other and each row's count -> the
        SavedModel's ``[N, max_len]`` (first max_len ids of a row, as the dataset reader keeps)."""
        flat = self._checked(name, np.asarray(flat), padded=True)
        return _pad(flat, np.asarray(lengths, np.int64), self.sparse[name], self.pad(name))

    def _checked(self, name: str, values: np.ndarray, padded: bool) -> np.ndarray:
        spec = self.id_specs[name]
        vocab = spec.get("vocabulary")
        if vocab:
            what = f"{KIND_WORDS[vocab['kind']]} ids (the raw ids of vocabulary {vocab['name']})"
            return _typed(values, name, vocab["kind"], what)
        rows = spec.get("num_rows")
        what = f"integer ids (rows of table {spec.get('table', name)}{f', 0..{rows - 1}' if rows else ''})"
        ids = _typed(values, name, "int", what)
        _check_rows(ids, name, spec, padded)
        return ids

    # ------------------------------------------------------------------ scoring
    def score(self, cols: dict, steps: int | None = None, max_support: int | None = None) -> dict:
        """``{output column: float32 [N]}``: per row the adapted and unadapted scores of every
        head; NaN on support rows. ``cols``: ``columns_from_frame``'s layout (1-D arrays; list
        features [N, max_len] padded with ``pad``; ids checked by ``ids`` / ``id_lists``).

        ``steps``: inner steps (default: the trained value; at most the SavedModel's max_steps).
        ``max_support``: support rows per task kept in input order (default: the trained support
        size, as ``gmeta evaluate``'s reader; 0 keeps all).
        """
        steps = self.steps if steps is None else int(steps)
        if not 0 <= steps <= int(self.meta["max_steps"]):
            raise InputError(f"steps={steps}: this SavedModel adapts with 0..{self.meta['max_steps']} inner "
                             f"steps (its max_steps, fixed when it was written)")
        cap = int(self.meta.get("support_size", 0)) if max_support is None else int(max_support)
        task = np.asarray(cols[self.task_column])
        role = np.asarray(cols[self.query_column]) != 0
        n = task.shape[0]
        out = {name: np.full(n, np.nan, np.float32) for name in self.output_columns}
        if n == 0 or not role.any():
            return out
        # group rows by (task, role), keeping input order inside a group; position in the group
        _, t_idx = np.unique(task, return_inverse=True)
        t_idx = t_idx.reshape(-1)
        order = np.lexsort((np.arange(n), role, t_idx))
        st, sr = t_idx[order], role[order]
        key = st * 2 + sr
        first = np.r_[True, key[1:] != key[:-1]]
        pos = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))
        # keep tasks that have query rows, and the first `cap` support rows of each
        has_query = np.zeros(st.max() + 1, bool)
        has_query[st[sr]] = True
        keep = has_query[st]
        if cap > 0:
            keep &= sr | (pos < cap)
        order, st, sr, pos = order[keep], st[keep], sr[keep], pos[keep]
        self._check_labels(cols, order[~sr])
        _, st = np.unique(st, return_inverse=True)   # dense task numbers, still sorted
        st = st.reshape(-1)
        n_tasks = int(st[-1]) + 1
        bounds = np.searchsorted(st, np.arange(0, n_tasks + self.tasks_per_call, self.tasks_per_call))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if lo >= hi:
                break
            rows, t, r, p = order[lo:hi], st[lo:hi] - st[lo], sr[lo:hi], pos[lo:hi]
            result = self._call(cols, rows, t, r, p, int(t[-1]) + 1, steps)
            for name in self.output_columns:
                out[name][rows[r]] = result[name][t[r], p[r]]
        return out

    def _check_labels(self, cols: dict, support_rows) -> None:
        for lab in self.labels:
            if support_rows.size == 0:
                return
            if lab not in cols:
                raise InputError(f"support rows need the label column {lab!r} (the inner loop fits it)")
            bad = int(np.isnan(cols[lab][support_rows]).sum())
            if bad:
                raise InputError(f"column {lab!r}: {bad} support rows have no {lab!r} label; every support "
                                 f"row (is_query 0) needs one, the inner loop fits it")

    def _call(self, cols, rows, t, r, p, n_tasks: int, steps: int) -> dict:
        tf = self._tf
        inputs = {}
        for prefix, sel in (("support_", ~r), ("query_", r)):
            ti, pi, ri = t[sel], p[sel], rows[sel]
            width = int(pi.max()) + 1 if pi.size else 1
            mask = np.zeros((n_tasks, width), np.float32)
            mask[ti, pi] = 1.0
            inputs[prefix + "mask"] = mask
            names = list(self.sparse) + self.dense + (self.labels if prefix == "support_" else [])
            for name in names:
                values = cols[name]
                fill = self.pad(name) if name in self.sparse else 0
                block = np.full((n_tasks, width) + values.shape[1:], fill, values.dtype)
                block[ti, pi] = values[ri]
                inputs[prefix + name] = block
        tensors = {k: tf.constant(v) for k, v in inputs.items()}
        if steps == self.steps:
            result = self._adapt(**tensors)
        else:
            result = self._adapt_steps(steps=tf.constant(steps, tf.int32), **tensors)
        return {k: v.numpy() for k, v in result.items()}

    def predict_frame(self, frame, steps: int | None = None):
        """DataFrame rows -> DataFrame of the query rows: task id, ``row`` (the row's position in
        the input), and the adapted / unadapted score of every head."""
        import pandas as pd

        cols = self.columns_from_frame(frame)
        scores = self.score(cols, steps=steps)
        query = np.flatnonzero(cols[self.query_column] != 0)
        out = {self.task_column: cols[self.task_column][query], ROW_COLUMN: query.astype(np.int64)}
        out.update({name: scores[name][query] for name in self.output_columns})
        return pd.DataFrame(out)


def _ints(series, name: str) -> np.ndarray:
    values = series.to_numpy()
    if values.dtype.kind not in "iub":
        if values.dtype.kind == "f" and not np.isnan(values).any() and (values == np.round(values)).all():
            return values.astype(np.int64)
        raise InputError(f"column {name!r} must hold integers, got {values.dtype}")
    return values.astype(np.int64)


def _floats(series, name: str) -> np.ndarray:
    """Labels and dense features as float32 (None -> NaN: a support row without its label)."""
    try:
        return series.to_numpy(np.float32, na_value=np.nan)
    except (TypeError, ValueError):
        raise InputError(f"column {name!r} must hold numbers, got {_described(series.to_numpy(object))}") from None


def _is_empty(values: np.ndarray) -> np.ndarray:
    """None, NaN or the empty string (the raw-id padding), elementwise."""
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind == "O":
        import pandas as pd

        return np.asarray(pd.isna(values), bool) | (values == "")
    if values.dtype.kind in "US":
        return values == values.dtype.type()
    return np.zeros(values.shape, bool)


def _holds(values: np.ndarray) -> str:
    """What a column's values are: ``int``, ``string``, ``float``, ``bool`` or another word
    (object columns are inferred by pandas, in C)."""
    kind = values.dtype.kind
    if kind == "O":
        import pandas as pd

        inferred = pd.api.types.infer_dtype(values, skipna=True)
        kind = {"integer": "i", "string": "U", "floating": "f", "mixed-integer-float": "f",
                "boolean": "b", "empty": "i"}.get(inferred, inferred)
        if kind == "f":
            values = values.astype(np.float64)
    if kind == "f":
        return "int" if bool((values == np.round(values)).all()) else "float"
    return {"i": "int", "u": "int", "U": "string", "S": "string", "b": "bool"}.get(kind, kind)


def _described(values: np.ndarray) -> str:
    """``_holds`` in the words of an error message."""
    got = _holds(values)
    return HOLDS.get(got, f"{got} values")


def _typed(values: np.ndarray, name: str, want: str, what: str) -> np.ndarray:
    """Ids of the kind ``want`` (``int`` or ``string``) as int64 or str objects; ``InputError``
    saying ``what`` the column takes when a value is empty or of another kind."""
    empty = int(_is_empty(values).sum())
    if empty:
        raise InputError(f"column {name!r}: {empty} of {values.size} ids are empty (None, NaN or \"\"); "
                         f"every row needs {what}")
    if values.size and _holds(values) != want:
        raise InputError(f"column {name!r}: expected {what}, got {_described(values)}")
    return values.astype(np.int64) if want == "int" else values.astype(str).astype(object)


def _check_rows(ids: np.ndarray, name: str, spec: dict, padded: bool) -> None:
    """Table rows as training reads them: no negative id (lists may hold the -1 padding) and,
    unless the table is hashed, none at or past its size."""
    table, rows = spec.get("table", name), spec.get("num_rows")
    low = ids < (ROW_PAD if padded else 0)
    if low.any():
        raise InputError(f"column {name!r}: id {int(ids[low][0])} is negative ({int(low.sum())} of {ids.size} "
                         f"ids); send rows{f' 0..{rows - 1}' if rows else ''} of table {table}"
                         f"{' (-1 pads a list)' if padded else ''}")
    if rows and not spec.get("hashed", False):
        high = ids >= rows
        if high.any():
            raise InputError(f"column {name!r}: id {int(ids[high][0])} is out of range (table {table} has "
                             f"{rows} rows; {int(high.sum())} of {ids.size} ids): send ids 0..{rows - 1}; a new "
                             f"id has no row until the table grows (or is hashed) and the model is retrained")


def _flatten(series) -> tuple:
    """A column of lists (None or NaN: an empty list) -> (every value in order, each row's count)."""
    cells = [_list_cell(v, series.name) for v in series.to_numpy(object)]
    lengths = np.fromiter((len(v) for v in cells), np.int64, count=len(cells))
    return np.fromiter(chain.from_iterable(cells), object, count=int(lengths.sum())), lengths


def _list_cell(value, name: str):
    """A list feature's cell as a sequence; a scalar is a mistake worth naming, not a list of one."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ()
    raise InputError(f"column {name!r}: expected a list of ids in every row, got {type(value).__name__} "
                     f"{value!r}")


def _pad(flat: np.ndarray, lengths: np.ndarray, max_len: int, pad) -> np.ndarray:
    """Values one row after another -> ``[N, max_len]`` padded with ``pad``; a longer row keeps its
    first max_len values, as the dataset reader does."""
    n = lengths.shape[0]
    out = np.full((n, max_len), pad, flat.dtype)
    row = np.repeat(np.arange(n), lengths)
    col = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = col < max_len
    out[row[keep], col[keep]] = flat[keep]
    return out
