"""Scoring cold users with the SavedModel: rows in, adapted and unadapted scores per query row out.

Standalone on purpose: this file imports numpy, TensorFlow and (for DataFrames) pandas, never
gmeta or Horovod. It ships inside the MLflow model (an artifact the pyfunc loads by path) and
runs under ``mlflow models serve`` in a plain environment; ``gmeta predict`` uses the same code.

Rows look like the dataset's: the task column (``task_id``), the role column (``is_query``: 0
support, 1 query), the labels the inner loop needs on support rows (``click``, ...; ignored on
query rows), and the model's features (sparse ids int64, list features as lists or a padded
``[N, L]`` array with -1, dense float). ``ServingRuntime.score`` groups the rows by task without
a Python loop over rows, packs up to ``tasks_per_call`` tasks into one padded call of the
SavedModel's ``adapt_and_predict`` signature (support rows in input order, capped like the
evaluation reader at the trained support size), and returns per row the adapted and the
unadapted score of every head (NaN on support rows).
"""

from __future__ import annotations

import json
import os

import numpy as np

SERVING_META = "gmeta_serving.json"
ROW_COLUMN = "row"
OUTPUT_KINDS = ("adapted", "unadapted")


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
        missing = [c for c in [self.task_column, self.query_column] + self.feature_columns()
                   if c not in frame.columns]
        if missing:
            raise ValueError(f"input is missing columns {missing}; expected {self.input_columns()}")
        cols = {self.task_column: _ints(frame[self.task_column], self.task_column),
                self.query_column: _ints(frame[self.query_column], self.query_column)}
        for name, max_len in self.sparse.items():
            cols[name] = _pad_lists(frame[name], max_len) if max_len > 1 else _ints(frame[name], name)
        for name in self.dense + [lab for lab in self.labels if lab in frame.columns]:
            cols[name] = frame[name].to_numpy(np.float32, na_value=np.nan)
        return cols

    # ------------------------------------------------------------------ scoring
    def score(self, cols: dict, steps: int | None = None, max_support: int | None = None) -> dict:
        """``{output column: float32 [N]}``: per row the adapted and unadapted scores of every
        head; NaN on support rows. ``cols``: ``columns_from_frame``'s layout (1-D arrays, list
        features int64 [N, max_len] padded with -1).

        ``steps``: inner steps (default: the trained value; at most the SavedModel's max_steps).
        ``max_support``: support rows per task kept in input order (default: the trained support
        size, as ``gmeta evaluate``'s reader; 0 keeps all).
        """
        steps = self.steps if steps is None else int(steps)
        if not 0 <= steps <= int(self.meta["max_steps"]):
            raise ValueError(f"steps={steps}: this SavedModel adapts with 0..{self.meta['max_steps']} inner "
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
                raise ValueError(f"support rows need the label column {lab!r} (the inner loop fits it)")
            bad = int(np.isnan(cols[lab][support_rows]).sum())
            if bad:
                raise ValueError(f"{bad} support rows have no {lab!r} label; every support row needs one")

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
                fill = -1 if name in self.sparse else 0
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
        raise ValueError(f"column {name!r} must hold integers, got {values.dtype}")
    return values.astype(np.int64)


def _pad_lists(series, max_len: int) -> np.ndarray:
    """A column of id lists -> int64 [N, max_len] padded with -1 (longer lists keep their first
    max_len ids, as the dataset reader does)."""
    values = series.to_numpy(object)
    n = values.shape[0]
    lengths = series.map(lambda v: 0 if v is None or isinstance(v, float) else len(v)).to_numpy(np.int64)
    out = np.full((n, max_len), -1, np.int64)
    if lengths.sum() == 0:
        return out
    flat = np.concatenate([np.asarray(v, np.int64).reshape(-1) for v in values[lengths > 0]])
    row = np.repeat(np.arange(n), lengths)
    col = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = col < max_len
    out[row[keep], col[keep]] = flat[keep]
    return out
