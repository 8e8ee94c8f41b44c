"""Pass 1's work on one input batch: join the side tables, make the derived columns, and turn the
spec's columns into the checked, normalised columns the partition files hold. Every bad value is
a ``DataError`` naming the file, the column and the row (1-based, header not counted).

Partition columns: ``t`` task, ``o`` order (int64 or float64; timestamps as int64 microseconds),
``k0..`` tie-breakers, ``q`` query flag, ``s`` split code, ``e`` the other side's entity (for its
cold rule and negatives), ``bt`` / ``be`` the value a task / other-side cold rule ranks ``by``
(float64, -inf for null), ``L.<label>`` float32, ``F.<feature>`` raw ids (string or int64, or lists of them),
``D.<dense>`` float32. Their types are fixed by the first batch; later batches are cast to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gmeta.io.errors import DataError
from gmeta.tools.table.source import check_type, derive_column
from gmeta.tools.table.spec import SPLITS, SpecError, TableConfig

TASK, ORDER, QUERY, SPLIT, OTHER = "t", "o", "q", "s", "e"
BY_TASK, BY_OTHER = "bt", "be"
US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 1}   # ns: divided, see _timestamps


def tie(k: int) -> str:
    return f"k{k}"


def label_col(name: str) -> str:
    return f"L.{name}"


def feature_col(name: str) -> str:
    return f"F.{name}"


def dense_col(name: str) -> str:
    return f"D.{name}"


@dataclass(frozen=True)
class ColumnPlan:
    """Where each column the spec uses comes from: ``events`` (read from every file, with its uses
    checked per file), ``side_of`` (column -> side table index), ``derived`` (made per batch)."""

    events: dict
    side_of: dict
    derived: tuple

    @property
    def read(self) -> list:
        return list(self.events)


def uses_of(cfg: TableConfig) -> list:
    """(column, use) of every column the spec reads."""
    uses = [(cfg.task, "task"), (cfg.order[0], "order")] + [(c, "tie") for c in cfg.order[1:]]
    uses += [(lab.column, "label") for lab in cfg.labels]
    uses += [(cfg.query_column, "query")] if cfg.query_column else []
    uses += [(cfg.split_column, "split")] if cfg.split_column else []
    uses += [(f.column, "delimited" if f.delimiter else "id") for f in cfg.sparse]
    uses += [(d.column, "dense") for d in cfg.dense]
    uses += [(cfg.other_column(), "task")] if cfg.needs_other else []
    uses += [(rule.by, "by") for rule in (cfg.task_rule, cfg.other_rule) if rule.by]
    return uses


def plan_columns(cfg: TableConfig, schema: pa.Schema, file: str, sides: list) -> ColumnPlan:
    """Resolve every used column to the events, a side table or a derived column; a column found
    nowhere is a DataError naming the first events file and listing what there is."""
    events, side_of, derived = {}, {}, []
    for j in cfg.joins:
        if j.on not in schema.names:
            raise DataError(f"join column {j.on!r} (spec: join {j.path}) is not in the events; they have "
                            f"{schema.names}", file=file, column=j.on)
        events.setdefault(j.on, []).append("key")
    by_name = {d.name: d for d in cfg.derive}
    for column, use in uses_of(cfg):
        if column in schema.names:
            events.setdefault(column, []).append(use)
            continue
        side = next((k for k, s in enumerate(sides) if column in s.columns), None)
        if side is not None:
            side_of[column] = side
            check_type(sides[side].table.schema.field(column).type, use, sides[side].name, column)
        elif column in by_name and by_name[column].column in schema.names:
            events.setdefault(by_name[column].column, []).append("derive")
            if by_name[column] not in derived:
                derived.append(by_name[column])
        else:
            sides_text = "; ".join(f"{s.name}: {s.columns}" for s in sides) or "no side tables"
            raise DataError(f"column is missing: not in the events ({schema.names}), not in a side table "
                            f"({sides_text}) and not derived; fix the spec or the input", file=file, column=column)
    return ColumnPlan(events, side_of, tuple(derived))


def _decoded(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values


def _ids(values) -> pa.Array:
    """Raw ids as string or int64."""
    values = _decoded(values)
    return values.cast(pa.int64() if pa.types.is_integer(values.type) else pa.string())


def _first_failing(values: pa.Array, parse) -> int:
    """Index of the first value ``parse`` refuses (bisection; only on the error path)."""
    lo, hi = 0, len(values)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            parse(values.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            hi = mid
    return lo


def _parse_time(values: pa.Array) -> pa.Array:
    """ISO-8601 strings -> int64 microseconds (all with a zone offset, or all without)."""
    try:
        return values.cast(pa.timestamp("us")).cast(pa.int64())
    except pa.ArrowInvalid:
        return values.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())


ORDER_PARSERS = {"int": lambda v: v.cast(pa.int64()), "float": lambda v: v.cast(pa.float64()), "time": _parse_time}


class Extractor:
    """Turns input batches into partition batches of one fixed schema (set by the first batch)."""

    def __init__(self, cfg: TableConfig, plan: ColumnPlan, sides: list, fmt: str):
        self.cfg, self.plan, self.sides = cfg, plan, sides
        self.csv = fmt == "csv"
        self.order_kind = None          # int | float | time
        self.kinds = {}                 # TASK, OTHER, tie k, feature table -> arrow type of its raw values
        self.side_misses = [0] * len(sides)
        self.schema = None
        self._file, self._first = "", 0

    # ------------------------------------------------------------------ errors
    def _fail(self, mask, column: str, what) -> None:
        """Raise for the first row where ``mask`` is true; ``what(i)`` says what is wrong."""
        i = int(np.flatnonzero(mask)[0])
        row = self._first + i + 1
        where = f"row {row}" + (f" (line {row + 1})" if self.csv else "")
        raise DataError(f"{where}: {what(i)}", file=self._file, column=column)

    # ------------------------------------------------------------------ columns
    def columns(self, batch: pa.RecordBatch) -> dict:
        """Every used column of the batch: its own, the side tables', the derived ones."""
        cols = {name: batch.column(name) for name in self.plan.events}
        wanted = {}
        for column, side in self.plan.side_of.items():
            wanted.setdefault(side, []).append(column)
        for side, columns in wanted.items():
            got, misses = self.sides[side].take(cols[self.sides[side].join.on], columns)
            self.side_misses[side] += misses
            cols.update(got)
        for d in self.plan.derived:
            cols[d.name] = derive_column(cols[d.column], d, self._file)
        return cols

    def __call__(self, file: str, first_row: int, batch: pa.RecordBatch) -> pa.RecordBatch:
        self._file, self._first = file, first_row
        cfg = self.cfg
        cols = self.columns(batch)
        out = {TASK: self._task(cols[cfg.task], cfg.task), ORDER: self._order(cols[cfg.order[0]], cfg.order[0])}
        for k, column in enumerate(cfg.order[1:]):
            out[tie(k)] = self._kind(tie(k), _ties(cols[column]), column)
        if cfg.query_column:
            out[QUERY] = self._query(cols[cfg.query_column], cfg.query_column)
        if cfg.split_column:
            out[SPLIT] = self._split(cols[cfg.split_column], cfg.split_column)
        if cfg.needs_other:
            out[OTHER] = self._kind(OTHER, _ids(cols[cfg.other_column()]), cfg.other_column())
        for key, rule in ((BY_TASK, cfg.task_rule), (BY_OTHER, cfg.other_rule)):
            if rule.by:
                out[key] = _ranked(cols[rule.by])
        for lab in cfg.labels:
            out[label_col(lab.name)] = self._label(cols[lab.column], lab)
        for f in cfg.sparse:
            out[feature_col(f.name)] = self._feature(cols[f.column], f)
        for d in cfg.dense:
            out[dense_col(d.name)] = self._dense(cols[d.column], d)
        part = pa.RecordBatch.from_arrays(list(out.values()), names=list(out))
        if self.schema is None:
            self.schema = part.schema
        return part

    def other_side(self, keys: pa.Array, groups: dict) -> dict:
        """The partition columns of the other side's features for each of ``keys`` (what a
        sampled negative item carries): features read from the other side's id column, or from a
        side table joined on it (and columns derived from those)."""
        cfg, other = self.cfg, self.cfg.other_column()
        self._file, self._first = f"the {cfg.other_kind}s sampled as negatives", 0
        cols = {other: keys}
        for side in self.sides:
            if side.join.on == other:
                cols.update(side.take(keys, side.columns)[0])
        for d in cfg.derive:
            if d.name not in cols and d.column in cols:
                cols[d.name] = derive_column(cols[d.column], d, self._file)
        out = {}
        for f in [f for f in cfg.sparse if groups[f.name] == cfg.other_kind] + \
                 [d for d in cfg.dense if d.group == cfg.other_kind]:
            if f.column not in cols:
                raise SpecError(f"negatives: {cfg.other_kind} feature {f.name!r} reads column {f.column!r}, which is "
                                f"neither the {cfg.other_kind} id column {other!r} nor in a side table joined on it, "
                                f"so a sampled {cfg.other_kind} has no value for it; join its side table on {other!r} "
                                f"or give the feature another group")
            if f in cfg.dense:
                out[dense_col(f.name)] = self._dense(cols[f.column], f)
            else:
                out[feature_col(f.name)] = self._feature(cols[f.column], f)
        return out

    def _kind(self, key, values: pa.Array, column: str) -> pa.Array:
        """``values`` cast to the type the first batch gave ``key``."""
        kind = self.kinds.setdefault(key, values.type)
        if values.type == kind:
            return values
        try:
            return values.cast(kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            i = _first_failing(values, lambda v: v.cast(kind))
            self._fail(np.arange(len(values)) == i, column,
                       lambda i: f"value {values[i].as_py()!r} is not {kind} like the first rows' values; give the "
                                 f"column one type in every file")

    def _task(self, values, column: str) -> pa.Array:
        ids = _ids(values)
        empty = ids.is_null()
        if pa.types.is_string(ids.type):
            empty = pc.or_(empty, pc.equal(pc.utf8_length(ids), 0))
        empty = pc.fill_null(empty, True).to_numpy(zero_copy_only=False)
        if empty.any():
            self._fail(empty, column, lambda i: "no task id (null or empty); every event needs its task")
        return self._kind(TASK, ids, column)

    def _order(self, values, column: str) -> pa.Array:
        values = _decoded(values)
        nulls = values.is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            self._fail(nulls, column, lambda i: "no order value (null); every event needs its time")
        t = values.type
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            kind, parsed = ("int" if pa.types.is_integer(t) else "float"), values.cast(
                pa.int64() if pa.types.is_integer(t) else pa.float64())
        elif pa.types.is_timestamp(t) or pa.types.is_date(t):
            kind, parsed = "time", _timestamps(values)
        else:
            kind, parsed = self._parse_order(values.cast(pa.string()), column)
        if self.order_kind is None:
            self.order_kind = kind
        if kind != self.order_kind:
            if {kind, self.order_kind} == {"int", "float"}:
                return self._kind(ORDER, parsed, column)
            raise DataError(f"order values here are {kind} but {self.order_kind} in the first rows read; give the "
                            f"order column one kind in every file", file=self._file, column=column)
        return self._kind(ORDER, parsed, column)

    def _parse_order(self, values: pa.Array, column: str) -> tuple:
        """Strings: ``timestamp_format`` (strptime) where given, else numbers or ISO-8601."""
        fmt = self.cfg.timestamp_format
        if fmt:
            parsed = pc.strptime(values, format=fmt, unit="us", error_is_null=True)
            bad = parsed.is_null().to_numpy(zero_copy_only=False)
            if bad.any():
                self._fail(bad, column, lambda i: f"{values[i].as_py()!r} does not parse with timestamp_format "
                                                  f"{fmt!r}")
            return "time", parsed.cast(pa.int64())
        kinds = [self.order_kind] if self.order_kind else list(ORDER_PARSERS)
        for kind in kinds:
            try:
                return kind, ORDER_PARSERS[kind](values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                continue
        parse = ORDER_PARSERS[kinds[-1]]
        i = _first_failing(values, parse)
        expected = {"int": "an integer like the first rows'", "float": "a number like the first rows'",
                    "time": "a number or an ISO-8601 timestamp"}[kinds[-1]]
        self._fail(np.arange(len(values)) == i, column,
                   lambda i: f"{values[i].as_py()!r} does not parse as {expected}; fix it, or give "
                             f"timestamp_format (strptime, e.g. '%d/%m/%Y %H:%M')")

    def _label(self, values, lab) -> pa.Array:
        values = _decoded(values)
        nulls = values.is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            self._fail(nulls, lab.column, lambda i: f"no value for label {lab.name!r} (null)")
        x = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(x)
        if bad.any():
            self._fail(bad, lab.column, lambda i: f"non-finite value {x[i]} for label {lab.name!r}")
        y = lab.evaluate(x)
        if lab.is_event and not lab.op:
            bad = (y < 0) | (y > 1)
            if bad.any():
                self._fail(bad, lab.column,
                           lambda i: f"value {x[i]:g} is outside [0, 1]; a {lab.name} label says whether the event "
                                     f"happened (derive it, e.g. {lab.name}=\"{lab.column} >= 4\", or make the "
                                     f"column a rating label)")
        return pa.array(y, pa.float32())

    def _query(self, values, column: str) -> pa.Array:
        values = _decoded(values)
        x = pc.fill_null(values.cast(pa.int64()), -1).to_numpy(zero_copy_only=False)
        bad = (x != 0) & (x != 1)
        if bad.any():
            self._fail(bad, column, lambda i: f"value {values[i].as_py()!r}; the query column must be 0 (support) "
                                              f"or 1 (query)")
        return pa.array(x.astype(np.int8))

    def _split(self, values, column: str) -> pa.Array:
        values = _decoded(values).cast(pa.string())
        code = pc.fill_null(pc.index_in(values, value_set=pa.array(SPLITS)), -1).to_numpy(zero_copy_only=False)
        bad = code < 0
        if bad.any():
            self._fail(bad, column, lambda i: f"split {values[i].as_py()!r} is not one of {list(SPLITS)}")
        return pa.array(code.astype(np.int8))

    def _feature(self, values, f) -> pa.Array:
        values = _decoded(values)
        if f.delimiter:
            values = pc.split_pattern(values.cast(pa.string()), f.delimiter)
        if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            return self._list(values, f)
        ids = self._kind(f.table_name, _ids(values), f.column)
        drop = _dropped(ids, f.drop)
        if f.hashed:
            self._check_hashed(ids, drop, f)
            return ids
        return pc.if_else(pa.array(drop), pa.nulls(len(ids), ids.type), ids) if drop.any() else ids

    def _list(self, lists, f) -> pa.Array:
        """A list column without the dropped values and nulls (a null list is an empty one)."""
        flat = self._kind(f.table_name, _ids(pc.list_flatten(lists)), f.column)
        parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
        keep = ~_dropped(flat, f.drop)
        if f.hashed:
            self._check_hashed(flat, np.zeros(len(flat), bool), f)
        counts = np.bincount(parent[keep], minlength=len(lists))
        offsets = np.zeros(len(lists) + 1, np.int32)
        np.cumsum(counts, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))

    def _check_hashed(self, ids: pa.Array, drop: np.ndarray, f) -> None:
        if not pa.types.is_integer(ids.type):
            raise DataError(f"feature {f.name!r} is hashed (into {f.hashed} buckets) but holds {ids.type}; hash "
                            f"integer ids only, or give it a vocabulary (no 'hashed')", file=self._file,
                            column=f.column)
        x = pc.fill_null(ids, -1).to_numpy(zero_copy_only=False)
        bad = (x < 0) | drop
        if bad.any():
            self._fail(bad, f.column, lambda i: f"hashed feature {f.name!r} needs an id >= 0 (got "
                                                f"{ids[i].as_py()!r})")

    def _dense(self, values, d) -> pa.Array:
        values = _decoded(values)
        x = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
        nulls = values.is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            if d.fill is None:
                self._fail(nulls, d.column, lambda i: f"no value for dense feature {d.name!r} (null); give it a "
                                                      f"'fill' value in the spec")
            x = np.where(nulls, d.fill, x)
        bad = ~np.isfinite(x)
        if bad.any():
            self._fail(bad, d.column, lambda i: f"non-finite value {x[i]} for dense feature {d.name!r}")
        return pa.array(x.astype(np.float32))


def _ranked(values) -> pa.Array:
    """A cold rule's ``by`` column as float64 (dates and timestamps as microseconds), null -inf."""
    values = _decoded(values)
    if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        values = _timestamps(values)
    return pc.fill_null(values.cast(pa.float64()), -np.inf)


def _dropped(ids: pa.Array, drop) -> np.ndarray:
    """Nulls, empty strings and the spec's "none" values."""
    out = ids.is_null()
    if pa.types.is_string(ids.type):
        out = pc.or_(out, pc.equal(pc.utf8_length(ids), 0))
    if drop:
        out = pc.or_(out, pc.is_in(ids, value_set=pa.array([str(v) for v in drop]).cast(ids.type)))
    return pc.fill_null(out, True).to_numpy(zero_copy_only=False)


def _timestamps(values: pa.Array) -> pa.Array:
    """Timestamp or date values -> int64 microseconds since the epoch (UTC)."""
    t = values.type
    if pa.types.is_date(t):
        return values.cast(pa.timestamp("us")).cast(pa.int64())
    raw = values.cast(pa.int64())
    return pc.divide(raw, 1000) if t.unit == "ns" else pc.multiply(raw, US_PER[t.unit])


def _ties(values) -> pa.Array:
    """A tie-breaking column as string, int64 or float64 (timestamps as int64)."""
    values = _decoded(values)
    t = values.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return _timestamps(values)
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return values.cast(pa.int64())
    if pa.types.is_floating(t):
        return values.cast(pa.float64())
    return values.cast(pa.string())


def threshold(after, order_kind: str):
    """A cold rule's ``after`` in the order column's units: a number as given (epoch seconds for a
    timestamp column), an ISO date as epoch seconds (microseconds for a timestamp column)."""
    if after is None:
        return None
    if isinstance(after, str):
        try:
            us = _parse_time(pa.array([after])).to_numpy()[0]
        except pa.ArrowInvalid:
            raise DataError(f"cold rule 'after' = {after!r} is neither a number nor an ISO-8601 date") from None
        return int(us) if order_kind == "time" else us / 1e6
    return float(after) * 1e6 if order_kind == "time" else float(after)
