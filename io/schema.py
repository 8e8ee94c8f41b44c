"""The Meta-IO schema: which column plays which role, and which embedding table each id feeds.

A dataset is a directory::

    DIR/schema.json          this schema (``Schema.save`` / ``Schema.load``)
    DIR/<split>/*.orc        task-grouped ORC files, one sub-directory per split
                             (``train``, and evaluation splits such as ``user_cold``)

The schema is plain data (frozen dataclasses <-> JSON) so the sharding plan, the reader and the
models are all built from it without touching the files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from gmeta.io.fs import join, read_text, write_text

SCHEMA_FILE = "schema.json"
SCHEMA_VERSION = 1
LABEL_NAMES = ("click", "conversion", "rating")
#: labels that say whether an event happened: 1 it did, 0 it did not (a fraction: a rate); a rating
#: has no fixed scale and only needs to be finite
EVENT_LABELS = ("click", "conversion")
GROUPS = ("user", "item", "context")


class SchemaError(ValueError):
    """A schema file or a schema/data mismatch; the message names the file and the column."""


class NameLookupError(SchemaError, KeyError):
    """A table or feature name that is not there (a ValueError and a KeyError, so callers of the
    schema and of the sharding plan can catch what they always caught)."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def find_named(items, name: str, what: str):
    """The item of ``items`` whose ``.name`` is ``name``; the one lookup-by-name of gmeta."""
    for item in items:
        if item.name == name:
            return item
    raise NameLookupError(f"no {what} {name!r}; {what}s are {[i.name for i in items]}")


def id_rows(ids, num_rows: int, hashed: bool):
    """Non-negative ids -> table rows: modulo ``num_rows`` for a hashed table, unchanged otherwise.

    The one id-cleaning rule; ``%`` works alike on ints, numpy arrays and TF tensors. Negative ids
    mean "no row" and are the caller's to mask; range checks of unhashed ids are the caller's too.
    """
    return ids % num_rows if hashed else ids


@dataclass(frozen=True)
class TableSpec:
    """An embedding table. ``num_rows`` is the vocabulary size, or the bucket count if hashed."""

    name: str
    num_rows: int
    hashed: bool = False  # ids are taken modulo num_rows (unbounded ids allowed)

    def rows_of(self, ids):
        return id_rows(ids, self.num_rows, self.hashed)


@dataclass(frozen=True)
class SparseFeature:
    """An int64 id column. ``max_len == 1``: single-valued int64; ``> 1``: list<int64>, padded
    with -1 (and truncated) to ``max_len`` by the reader."""

    name: str
    table: str
    max_len: int = 1
    group: str = "context"  # user | item | context

    @property
    def is_list(self) -> bool:
        return self.max_len > 1


@dataclass(frozen=True)
class DenseFeature:
    name: str
    group: str = "context"


@dataclass(frozen=True)
class Schema:
    labels: tuple = ("click",)
    sparse: tuple = ()
    dense: tuple = ()
    tables: tuple = ()
    task_column: str = "task_id"
    query_column: str = "is_query"
    # float columns that are not model inputs (e.g. the generator's true click probability),
    # carried through the reader for oracle metrics.
    oracle: tuple = ()
    # the item-id feature whose embedding a cold-start generator (MetaEmb) learns to produce.
    item_id_feature: Optional[str] = None
    splits: tuple = ("train",)
    version: int = SCHEMA_VERSION
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    # ---------- lookups ----------
    def table(self, name: str) -> TableSpec:
        return find_named(self.tables, name, "table")

    def feature(self, name: str) -> SparseFeature:
        return find_named(self.sparse, name, "sparse feature")

    def features_of_table(self, table: str) -> tuple:
        return tuple(f for f in self.sparse if f.table == table)

    def column_names(self) -> list:
        """Every column an ORC file of this dataset must have, in canonical order."""
        return ([self.task_column, self.query_column] + list(self.labels)
                + [f.name for f in self.sparse] + [d.name for d in self.dense] + list(self.oracle))

    # ---------- validation ----------
    def validate(self, source: str = "schema") -> "Schema":
        names = self.column_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SchemaError(f"{source}: column names used twice: {dup}")
        if not self.labels:
            raise SchemaError(f"{source}: at least one label column is required ({LABEL_NAMES})")
        for lab in self.labels:
            if lab not in LABEL_NAMES:
                raise SchemaError(f"{source}: label {lab!r} is not one of {LABEL_NAMES}")
        tnames = [t.name for t in self.tables]
        if len(set(tnames)) != len(tnames):
            raise SchemaError(f"{source}: table names used twice: {tnames}")
        for t in self.tables:
            if t.num_rows <= 0:
                raise SchemaError(f"{source}: table {t.name!r} has num_rows={t.num_rows}; must be > 0")
        for f in self.sparse:
            if f.table not in tnames:
                raise SchemaError(f"{source}: sparse feature {f.name!r} uses unknown table {f.table!r}")
            if f.max_len < 1:
                raise SchemaError(f"{source}: sparse feature {f.name!r} has max_len={f.max_len}; must be >= 1")
            if f.group not in GROUPS:
                raise SchemaError(f"{source}: sparse feature {f.name!r} has group {f.group!r}; expected {GROUPS}")
        for d in self.dense:
            if d.group not in GROUPS:
                raise SchemaError(f"{source}: dense feature {d.name!r} has group {d.group!r}; expected {GROUPS}")
        if self.item_id_feature is not None and self.item_id_feature not in [f.name for f in self.sparse]:
            raise SchemaError(f"{source}: item_id_feature {self.item_id_feature!r} is not a sparse feature")
        if "train" not in self.splits:
            raise SchemaError(f"{source}: splits {list(self.splits)} must include 'train'")
        return self

    # ---------- JSON ----------
    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("labels", "oracle", "splits"):
            d[k] = list(d[k])
        d["sparse"] = [asdict(f) for f in self.sparse]
        d["dense"] = [asdict(f) for f in self.dense]
        d["tables"] = [asdict(t) for t in self.tables]
        return d

    @classmethod
    def from_json(cls, d: dict, source: str = "schema") -> "Schema":
        if not isinstance(d, dict):
            raise SchemaError(f"{source}: expected a JSON object")
        version = d.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise SchemaError(f"{source}: schema version {version} is not supported (expected {SCHEMA_VERSION})")
        known = {"labels", "sparse", "dense", "tables", "task_column", "query_column", "oracle",
                 "item_id_feature", "splits", "version", "meta"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SchemaError(f"{source}: unknown keys {unknown}; expected a subset of {sorted(known)}")
        try:
            schema = cls(
                labels=tuple(d.get("labels", ("click",))),
                sparse=tuple(SparseFeature(**f) for f in d.get("sparse", ())),
                dense=tuple(DenseFeature(**f) if isinstance(f, dict) else DenseFeature(name=f)
                            for f in d.get("dense", ())),
                tables=tuple(TableSpec(**t) for t in d.get("tables", ())),
                task_column=d.get("task_column", "task_id"),
                query_column=d.get("query_column", "is_query"),
                oracle=tuple(d.get("oracle", ())),
                item_id_feature=d.get("item_id_feature"),
                splits=tuple(d.get("splits", ("train",))),
                version=version,
                meta=dict(d.get("meta", {})),
            )
        except TypeError as exc:
            raise SchemaError(f"{source}: malformed entry: {exc}") from None
        return schema.validate(source)

    def save(self, directory: str) -> str:
        """Write ``schema.json`` into a local or remote dataset directory."""
        path = join(directory, SCHEMA_FILE)
        write_text(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str) -> "Schema":
        path = join(directory, SCHEMA_FILE)
        try:
            text = read_text(path)
        except FileNotFoundError:
            raise SchemaError(f"{path}: schema file not found (is {directory!r} a gmeta dataset?)") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_json(d, source=path)
