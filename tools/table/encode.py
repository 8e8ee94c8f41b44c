"""Raw values -> embedding-table rows, and the dataset's schema: vocabularies built from pass 1's
counts (``gmeta.io.vocab``: row 0 out of vocabulary, ``min_count``, extended from a previous
dataset's with ``--vocab-from``) or hashed integer ids (stored as given, rows = id % B)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gmeta.io.schema import DenseFeature, Schema, SparseFeature, TableSpec
from gmeta.io.vocab import ValueCounter, Vocabulary
from gmeta.tools.table.extract import dense_col, feature_col, label_col
from gmeta.tools.table.protocol import Arranged
from gmeta.tools.table.spec import SPLITS, SpecError, TableConfig


def kind_name(arrow_type: pa.DataType) -> str:
    return "int" if pa.types.is_integer(arrow_type) else "string"


def raw_values(column) -> pa.Array:
    """A partition column's raw ids, flattened for a list feature."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return pc.list_flatten(column) if pa.types.is_list(column.type) else column


def build_vocabularies(cfg: TableConfig, counters: dict, kinds: dict, previous: dict) -> dict:
    """``{table: Vocabulary}`` of every table that is not hashed: the values seen at least
    ``min_count`` times, sorted after the OOV row; with a previous vocabulary, its values keep
    their rows and the new frequent ones are appended."""
    out = {}
    for table, members in cfg.features_by_table().items():
        if members[0].hashed:
            if table in previous:
                raise SpecError(f"table {table!r} is hashed here but has a vocabulary in --vocab-from; keep the "
                                f"previous dataset's mapping (drop 'hashed')")
            continue
        kind = kind_name(kinds[table])
        counter = counters.get(table) or ValueCounter(kind)
        known = counter.frequent(cfg.table_min_count(table))
        if table in previous:
            if previous[table].kind != kind:
                raise SpecError(f"table {table!r}: --vocab-from holds {previous[table].kind} ids, this input "
                                f"{kind} ids; give the column the same type as before")
            out[table] = previous[table].extend(known)
        else:
            out[table] = Vocabulary.build(table, known, kind)
    return out


def build_schema(cfg: TableConfig, vocabs: dict, max_lens: dict, groups: dict, splits=SPLITS) -> Schema:
    """Labels in the spec's order, one table per vocabulary (its size) or hashed table (B)."""
    tables, sparse = [], []
    for table, members in cfg.features_by_table().items():
        hashed = members[0].hashed
        tables.append(TableSpec(table, hashed if hashed else vocabs[table].size, hashed=bool(hashed)))
    for f in cfg.sparse:
        max_len = max(f.max_len or max_lens[f.name], 2) if f.name in max_lens else 1
        sparse.append(SparseFeature(f.name, f.table_name, max_len=max_len, group=groups[f.name]))
    return Schema(labels=tuple(lab.name for lab in cfg.labels), sparse=tuple(sparse),
                  dense=tuple(DenseFeature(d.name, d.group) for d in cfg.dense), tables=tuple(tables),
                  item_id_feature=cfg.item_id_feature or None, splits=tuple(splits),
                  meta={"source": "table"}).validate("gmeta convert table schema")


class Encoder:
    """An arranged partition -> the Meta-IO table the writer takes (ids mapped to rows)."""

    def __init__(self, cfg: TableConfig, vocabs: dict, schema: Schema):
        self.cfg, self.vocabs, self.schema = cfg, vocabs, schema

    def _rows(self, f, column) -> pa.Array:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        is_list = pa.types.is_list(column.type)
        flat = pc.list_flatten(column) if is_list else column
        rows = flat.cast(pa.int64()) if f.hashed else pa.array(self.vocabs[f.table_name].rows(flat))
        if not is_list:
            return rows
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(column) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), rows)

    def table(self, a: Arranged) -> pa.Table:
        cfg, t = self.cfg, a.table
        columns = {self.schema.task_column: pa.array(a.task_id), self.schema.query_column: pa.array(a.is_query)}
        columns.update({lab.name: t.column(label_col(lab.name)) for lab in cfg.labels})
        columns.update({f.name: self._rows(f, t.column(feature_col(f.name))) for f in cfg.sparse})
        columns.update({d.name: t.column(dense_col(d.name)) for d in cfg.dense})
        return pa.table(columns)
