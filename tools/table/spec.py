"""What ``gmeta convert table`` converts: one frozen ``TableConfig`` (the task, order, labels,
features, side tables and split rules) and its checks. ``config`` builds it from a spec file and
flags. Every mistake is a ``SpecError`` naming the field or flag; README's "Your own data"
section documents every field.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from gmeta.io import fs
from gmeta.io.schema import EVENT_LABELS, GROUPS, LABEL_NAMES
from gmeta.tools.common import OutputConfig, check_flags

#: split names in the order the dataset lists them; a split column's values must be among them
SPLITS = ("train", "val", "user_cold", "item_cold", "user_item_cold")
FORMATS = ("csv", "parquet", "orc")
EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet", ".orc": "orc"}
TASK_KINDS = ("user", "item")
COMPARISONS = {">=": np.greater_equal, "<=": np.less_equal, "==": np.equal, "!=": np.not_equal,
               ">": np.greater, "<": np.less}
_LABEL_RE = re.compile(r"^\s*([^<>=!\s]+)\s*(?:(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?\s*$")
MIN_MEMORY_MB = 64   # the writers' reserve and reading take about 40 MB of it (tools/table/partition.py)


class SpecError(ValueError):
    """A bad spec field or flag; the message names it and says what to write instead."""


@dataclass(frozen=True)
class Label:
    """A label: an input column as is (``rating``), or a comparison made 0/1 (``rating >= 4``)."""

    name: str
    column: str
    op: str = ""
    value: float = 0.0

    @classmethod
    def parse(cls, name: str, expr, where: str) -> "Label":
        if name not in LABEL_NAMES:
            raise SpecError(f"{where}: label {name!r} is not one of {LABEL_NAMES}")
        m = _LABEL_RE.match(str(expr))
        if not m:
            raise SpecError(f"{where}: label {name!r} = {expr!r} is neither a column name nor 'COLUMN OP NUMBER' "
                            f"with OP one of {list(COMPARISONS)} (e.g. 'rating >= 4')")
        return cls(name, m.group(1), m.group(2) or "", float(m.group(3)) if m.group(3) else 0.0)

    @property
    def is_event(self) -> bool:
        """click and conversion say whether something happened: values in [0, 1]."""
        return self.name in EVENT_LABELS

    def evaluate(self, values: np.ndarray) -> np.ndarray:
        out = COMPARISONS[self.op](values, self.value) if self.op else values
        return np.asarray(out, np.float32)

    def text(self) -> str:
        return f"{self.column} {self.op} {self.value:g}" if self.op else self.column


@dataclass(frozen=True)
class Feature:
    """A sparse feature: raw string or integer ids -> a vocabulary (row 0 out of vocabulary), or
    integer ids hashed into ``hashed`` buckets; a list column or a ``delimiter``-split string is
    a list feature."""

    name: str
    column: str
    group: str = ""            # user | item | context; "" = inferred (see ``TableConfig.group_of``)
    table: str = ""            # the embedding table; "" = the feature's name (features may share one)
    min_count: int = 0         # vocabulary: values seen fewer times map to row 0; 0 = the spec's min_count
    hashed: int = 0            # > 0: integer ids stored as given, rows = id % hashed (no vocabulary)
    delimiter: str = ""        # split a string column on this into a list ("Action|Comedy")
    drop: tuple = ()           # raw values that mean "none": left out of lists, row 0 when single
    max_len: int = 0           # list features: length the reader pads/truncates to; 0 = the longest seen

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass(frozen=True)
class Dense:
    """A float feature; a null is ``fill`` where given, else an error."""

    name: str
    column: str
    group: str = "context"
    fill: Optional[float] = None


@dataclass(frozen=True)
class Join:
    """A side table (an items or users file), read whole, joined to every event on ``on`` (the
    events' column) = ``key`` (the side table's column); its columns become the events'."""

    path: str
    on: str
    key: str = ""              # "" = the same name as ``on``
    format: str = ""           # "" = from the extension
    columns: tuple = ()        # the columns it contributes; () = all but the key

    @property
    def key_column(self) -> str:
        return self.key or self.on


@dataclass(frozen=True)
class Derive:
    """A column made from another: a regular expression (RE2) whose first group is the value,
    e.g. the year in a title: ``"\\((\\d{4})\\)\\s*$"`` (no match is a null), and/or numeric
    ``buckets`` (ascending boundaries b1 < b2 < ...; a value below b1 is bucket 1, one in
    [b_i, b_i+1) bucket i + 1, a null stays null), e.g. decades of a year or age groups."""

    name: str
    column: str
    regex: str = ""            # "" = the value itself
    type: str = "string"       # string | int (buckets are int)
    buckets: tuple = ()


@dataclass(frozen=True)
class ColdRule:
    """Who is cold: first event after ``after`` (a number in the order column's units, or an ISO
    date), or the ``fraction`` that arrived last (or a seeded draw with ``random``, or the
    fraction with the largest ``by``, e.g. a release year; ties by first event, then key).
    ``column`` names the entity for the side that is not the task (default: the item id
    feature's column)."""

    after: Union[None, float, str] = None
    fraction: float = 0.0
    random: bool = False
    column: str = ""
    by: str = ""               # with fraction: the keys with the largest value of this column are cold

    @property
    def active(self) -> bool:
        return self.after is not None or self.fraction > 0


@dataclass(frozen=True, kw_only=True)
class TableConfig(OutputConfig):
    """Everything one conversion needs (flags over spec over defaults)."""

    spec: str = ""
    src: str = ""
    inputs: tuple = ()
    format: str = ""
    csv_delimiter: str = ","
    task: str = ""
    task_kind: str = "user"
    order: tuple = ()
    timestamp_format: str = ""
    query_last: int = 0
    query_fraction: float = 0.0
    query_column: str = ""
    min_events: int = 0        # 0: query_last + 1 (or 2); tasks with fewer events are dropped
    max_events: int = 0        # 0: no maximum
    labels: tuple = ()
    joins: tuple = ()
    derive: tuple = ()
    sparse: tuple = ()
    min_count: int = 1
    dense: tuple = ()
    item_id_feature: str = ""
    cold_users: ColdRule = ColdRule()
    cold_items: ColdRule = ColdRule()
    split_column: str = ""
    val_fraction: float = 0.0
    negatives: int = 0         # > 0: implicit feedback, this many sampled label-0 rows per query set
    support_negatives: float = 0.0   # sampled label-0 rows per support event (with negatives)
    seed: int = 0
    vocab_from: str = ""
    memory_mb: int = 512
    partitions: int = 0        # 0: chosen from --memory-mb and the input's size
    tmp_dir: str = ""

    # ------------------------------------------------------------------ derived facts
    @property
    def other_kind(self) -> str:
        return "item" if self.task_kind == "user" else "user"

    @property
    def task_rule(self) -> ColdRule:
        return self.cold_users if self.task_kind == "user" else self.cold_items

    @property
    def other_rule(self) -> ColdRule:
        return self.cold_items if self.task_kind == "user" else self.cold_users

    @property
    def min_task_events(self) -> int:
        return self.min_events or (self.query_last + 1 if self.query_last else 2)

    @property
    def needs_other(self) -> bool:
        """The other side's entity is needed per event: for its cold rule or for negatives."""
        return self.other_rule.active or self.negatives > 0 or self.support_negatives > 0

    def other_column(self) -> str:
        """The column of the entity that is not the task (for its cold rule)."""
        rule = self.other_rule
        if rule.column:
            return rule.column
        if self.task_kind == "user" and self.item_id_feature:
            return next(f.column for f in self.sparse if f.name == self.item_id_feature)
        return ""

    def group_of(self, feature: Feature, side_of: dict) -> str:
        """A feature's group: its own, else the task kind's for the task column (or a side table
        joined on it), "item" for the item column (or a side table joined on it), else context."""
        if feature.group:
            return feature.group
        column = side_of.get(feature.column, feature.column)
        if column == self.task:
            return self.task_kind
        if column == self.other_column():
            return self.other_kind
        return "context"

    def features_by_table(self) -> dict:
        tables = {}
        for f in self.sparse:
            tables.setdefault(f.table_name, []).append(f)
        return tables

    def table_min_count(self, table: str) -> int:
        return self.features_by_table()[table][0].min_count or self.min_count

    # ------------------------------------------------------------------ checks
    def validate(self) -> "TableConfig":
        out = self.output_checks(0, "")
        names = ([lab.name for lab in self.labels] + [f.name for f in self.sparse] + [d.name for d in self.dense])
        dup = sorted({n for n in names if names.count(n) > 1} | (set(names) & {"task_id", "is_query"}))
        query_rules = [bool(self.query_last), bool(self.query_fraction), bool(self.query_column)]
        check_flags([
            (bool(self.inputs), "--input", "(spec: input) must name the event files or directories", self.inputs),
            out["--out"],
            (self.format in ("",) + FORMATS, "--format", f"(spec: format) must be one of {FORMATS}", repr(self.format)),
            (bool(self.task), "--task", "(spec: task) must name the task column (a user, or an item for "
                                        "item-side tasks)", repr(self.task)),
            (self.task_kind in TASK_KINDS, "--task-kind", f"(spec: task_kind) must be one of {TASK_KINDS}",
             repr(self.task_kind)),
            (bool(self.order), "--order", "(spec: order) must name the order column (a timestamp or a number), "
                                          "tie-breaking columns after it", self.order),
            (sum(query_rules) == 1, "--query-last/--query-fraction/--query-column",
             "(spec: query {last | fraction | column}) must choose exactly one support/query rule",
             dict(last=self.query_last, fraction=self.query_fraction, column=self.query_column)),
            (self.query_last >= 0, "--query-last", "(spec: query.last) must be >= 1", self.query_last),
            (0 <= self.query_fraction < 1, "--query-fraction", "(spec: query.fraction) must be in (0, 1)",
             self.query_fraction),
            (self.min_events >= 0, "--min-events", "(spec: min_events) must be >= 1", self.min_events),
            (self.max_events == 0 or self.max_events >= self.min_task_events, "--max-events",
             f"(spec: max_events) must be 0 (none) or >= min_events ({self.min_task_events})", self.max_events),
            (bool(self.labels), "--label", "(spec: labels) must define at least one label, e.g. "
                                           "click=\"rating >= 4\"", self.labels),
            (len({lab.name for lab in self.labels}) == len(self.labels), "--label",
             "(spec: labels) names a label twice", [lab.name for lab in self.labels]),
            (not dup, "--sparse/--dense/--label", "(spec: sparse, dense, labels) output names must be unique and not "
                                                  "task_id or is_query", dup),
            (self.min_count >= 1, "--min-count", "(spec: min_count) must be >= 1", self.min_count),
            (not self.item_id_feature or self.item_id_feature in [f.name for f in self.sparse], "--item",
             "(spec: item_id_feature) must name a sparse feature", repr(self.item_id_feature)),
            (not (self.split_column and (self.cold_users.active or self.cold_items.active or self.val_fraction)),
             "--split-column", "(spec: split_column) replaces the cold and val rules; give one or the other",
             repr(self.split_column)),
            (0 <= self.val_fraction < 1, "--val-fraction", "(spec: val_fraction) must be in [0, 1)", self.val_fraction),
            (self.negatives >= 0, "--negatives", "(spec: negatives.query) must be >= 0", self.negatives),
            (self.support_negatives >= 0, "--support-negatives", "(spec: negatives.support) must be >= 0",
             self.support_negatives),
            (self.seed >= 0, "--seed", "(spec: seed) must be >= 0", self.seed),
            (self.memory_mb >= MIN_MEMORY_MB, "--memory-mb", f"must be >= {MIN_MEMORY_MB}", self.memory_mb),
            (self.partitions >= 0, "--partitions", "must be >= 0 (0: from --memory-mb)", self.partitions),
            out["--compression"],
            (self.rows_per_stripe >= 1, "--rows-per-stripe", "must be >= 1", self.rows_per_stripe),
        ], SpecError)
        for rule, name in ((self.cold_users, "users"), (self.cold_items, "items")):
            if rule.fraction and rule.after is not None:
                raise SpecError(f"spec: cold.{name}: give 'after' or 'fraction', not both")
            if not 0 <= rule.fraction < 1:
                raise SpecError(f"spec: cold.{name}.fraction (--cold-{name}-fraction) must be in [0, 1) "
                                f"(got {rule.fraction})")
        for rule, name in ((self.cold_users, "users"), (self.cold_items, "items")):
            if rule.by and (rule.after is not None or rule.random or not rule.fraction):
                raise SpecError(f"spec: cold.{name}.by ranks the {name} by {rule.by!r} and makes the largest "
                                f"'fraction' cold; give a fraction, not 'after' or 'random'")
        if self.other_rule.active and not self.other_column():
            raise SpecError(f"spec: cold.{self.other_kind}s needs a 'column' naming the {self.other_kind} ids "
                            f"(or an item_id_feature / --item for user tasks)")
        if self.negatives or self.support_negatives:
            if not self.other_column():
                raise SpecError(f"spec: negatives are {self.other_kind}s the task never had an event with: name the "
                                f"{self.other_kind} ids (item_id_feature / --item, or cold.{self.other_kind}s.column)")
            not_events = [lab.name for lab in self.labels if not lab.is_event]
            if not_events:
                raise SpecError(f"spec: negatives are sampled label-0 rows, which have no value for the label(s) "
                                f"{not_events}; use event labels (click, conversion) with negatives")
        for f in self.sparse:
            if f.group and f.group not in GROUPS:
                raise SpecError(f"spec: sparse feature {f.name!r}: group {f.group!r} is not one of {GROUPS}")
            if f.hashed < 0 or f.min_count < 0 or f.max_len < 0:
                raise SpecError(f"spec: sparse feature {f.name!r}: hashed, min_count and max_len must be >= 0")
        for table, members in self.features_by_table().items():
            settings = {(f.hashed, f.min_count) for f in members}
            if len(settings) > 1:
                raise SpecError(f"spec: features {[f.name for f in members]} share table {table!r} but differ in "
                                f"hashed/min_count; give them the same settings")
        for d in self.dense:
            if d.group not in GROUPS:
                raise SpecError(f"spec: dense feature {d.name!r}: group {d.group!r} is not one of {GROUPS}")
        for d in self.derive:
            if d.type not in ("string", "int"):
                raise SpecError(f"spec: derive {d.name!r}: type {d.type!r} must be string or int")
            try:
                b = np.asarray(d.buckets, dtype=float)
            except (TypeError, ValueError):
                b = np.full(1, np.nan)
            if d.buckets and (b.ndim != 1 or not np.all(np.isfinite(b)) or np.any(np.diff(b) <= 0)):
                raise SpecError(f"spec: derive {d.name!r}: buckets {list(d.buckets)} must be ascending numbers")
            if not d.regex and not d.buckets:
                raise SpecError(f"spec: derive {d.name!r}: give a regex, buckets, or both")
            if not d.regex:
                continue
            try:
                groups = re.compile(d.regex).groups
            except re.error as exc:
                raise SpecError(f"spec: derive {d.name!r}: regex {d.regex!r} does not compile: {exc}") from None
            if groups < 1:
                raise SpecError(f"spec: derive {d.name!r}: regex {d.regex!r} needs a (group) holding the value")
        return self


def resolve_path(path: str, src: str) -> str:
    """A spec's path relative to ``--src`` (absolute paths and URIs as given)."""
    if not src or fs.is_remote(path) or os.path.isabs(path) or path.startswith("file://"):
        return path
    return fs.join(src, path)
