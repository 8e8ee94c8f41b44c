"""Vocabularies: a team's raw ids (strings or 64-bit integers) -> embedding-table rows, kept with
the dataset so that training, serving and tomorrow's dataset all map an id to the same row.

On disk, beside ``schema.json``::

    DIR/_vocab/vocab.json          {"format": 1, "tables": {TABLE: {"kind": "string" | "int",
                                    "size": ROWS, "oov_row": 0, "version": SHA, "previous": SHA | null,
                                    "file": "TABLE.parquet"}}}
    DIR/_vocab/TABLE.parquet       one column ``value``: the raw value of row i at position i;
                                   position 0 (the out-of-vocabulary row) holds null

Row 0 of every vocabulary-mapped table is the out-of-vocabulary row: an id never seen (or seen
fewer than ``min_count`` times when the vocabulary was built) maps there, which is the normal case
for a cold user or item, not an error. Known values are sorted, so the same data always gives the
same rows; ``extend`` keeps every known value on its row and appends new ones (sorted) at the end,
which is what a daily retrain needs (``--vocab-from``). ``version`` is a hash of the values, so a
model can tell whether a dataset's rows mean what its own rows mean.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gmeta.io import fs
from gmeta.io.errors import DataError

VOCAB_DIR = "_vocab"
VOCAB_FILE = "vocab.json"
VOCAB_FORMAT = 1
OOV_ROW = 0
KINDS = {"string": pa.string(), "int": pa.int64()}
MERGE_MIN = 1 << 16    # counts merge once this many (or as many as already merged) new entries wait


def kind_of(values: pa.Array | pa.ChunkedArray, column: str = "") -> str:
    """``string`` or ``int`` for a raw id column; anything else is not an id."""
    t = values.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    raise DataError(f"type {t} cannot hold ids: use strings or integers", column=column or None)


def _as_kind(values, kind: str) -> pa.Array:
    """Raw values as the vocabulary's arrow type (one chunk; dictionaries decoded)."""
    if isinstance(values, np.ndarray):
        values = pa.array(values)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values.cast(KINDS[kind])


def _version(values: pa.Array) -> str:
    digest = hashlib.sha256()
    for buf in values.buffers():
        if buf is not None:
            digest.update(memoryview(buf))
    digest.update(str(len(values)).encode())
    return digest.hexdigest()[:16]


def reduce_by_key(keys, sums=(), mins=()) -> tuple:
    """``(distinct keys, [per-key sum of each of sums], [per-key minimum of each of mins])``.

    numpy over the keys' codes (``np.unique`` for integers, dictionary codes for strings) rather
    than Acero's group_by, which takes about 7 MB of working memory per call (measured): this
    runs once per streamed batch, and the memory bound of a conversion counts it.
    """
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if pa.types.is_integer(keys.type):
        uniq, codes = np.unique(keys.to_numpy(zero_copy_only=False), return_inverse=True)
        uniq = pa.array(uniq, keys.type)
    else:
        encoded = pc.dictionary_encode(keys)
        uniq, codes = encoded.dictionary, encoded.indices.to_numpy(zero_copy_only=False)
    n = len(uniq)
    out_sums = []
    for v in sums:
        total = np.zeros(n, np.asarray(v).dtype)
        np.add.at(total, codes, v)
        out_sums.append(total)
    out_mins = []
    for v in mins:
        v = np.asarray(v)
        low = np.full(n, np.inf if v.dtype.kind == "f" else np.iinfo(v.dtype).max, v.dtype)
        np.minimum.at(low, codes, v)
        out_mins.append(low)
    return uniq, out_sums, out_mins


class ValueCounter:
    """Counts of raw values over a stream of batches, in memory proportional to the distinct
    values (not the rows): what building a vocabulary needs from data larger than memory."""

    def __init__(self, kind: str):
        self.kind = kind
        self._parts: list = []
        self._pending = 0           # entries in the parts since the last merge
        self._merged_size = 0
        self._rows = 0

    def add(self, values) -> None:
        values = _as_kind(values, self.kind)
        counts = pc.value_counts(values.drop_null())
        self._parts.append(pa.table({"value": counts.field("values"), "count": counts.field("counts")}))
        self._rows += len(values)
        self._pending += len(counts)
        if self._pending >= max(self._merged_size, MERGE_MIN):   # merge cost stays proportional to the distinct values
            self._parts = [self._merged()]

    def _merged(self) -> pa.Table:
        if not self._parts:
            return pa.table({"value": pa.array([], KINDS[self.kind]), "count": pa.array([], pa.int64())})
        t = pa.concat_tables(self._parts)
        values, (counts,), _ = reduce_by_key(t.column("value"), sums=[t.column("count").to_numpy()])
        self._pending, self._merged_size = 0, len(values)
        return pa.table({"value": values, "count": pa.array(counts, pa.int64())})

    def counts(self) -> pa.Table:
        """``value``, ``count`` of every distinct value seen."""
        merged = self._merged()
        self._parts = [merged]
        return merged

    def frequent(self, min_count: int) -> pa.Array:
        """The distinct values seen at least ``min_count`` times, sorted."""
        t = self.counts()
        kept = t.filter(pc.greater_equal(t.column("count"), min_count)).column("value").combine_chunks()
        return pc.take(kept, pc.sort_indices(kept))


@dataclass(frozen=True)
class Vocabulary:
    """One table's raw value -> row map (row 0: out of vocabulary)."""

    table: str
    kind: str                    # string | int
    values: pa.Array             # position = row; values[0] is null
    previous: Optional[str] = None  # version of the vocabulary this one extends

    @property
    def size(self) -> int:
        return len(self.values)

    @property
    def version(self) -> str:
        return _version(self.values)

    @classmethod
    def build(cls, table: str, known: pa.Array, kind: str) -> "Vocabulary":
        """From distinct known values (any order): OOV row, then the values sorted."""
        known = _as_kind(known, kind)
        known = pc.take(known, pc.sort_indices(known))
        return cls(table, kind, pa.concat_arrays([pa.nulls(1, KINDS[kind]), known]))

    def extend(self, seen: pa.Array) -> "Vocabulary":
        """Every known value keeps its row; values of ``seen`` not yet known are appended, sorted."""
        seen = _as_kind(seen, self.kind)
        new = seen.filter(pc.invert(pc.is_in(seen, value_set=self.values.drop_null())))
        new = pc.unique(new)
        new = pc.take(new, pc.sort_indices(new))
        return Vocabulary(self.table, self.kind, pa.concat_arrays([self.values, new]), previous=self.version)

    def rows(self, raw) -> np.ndarray:
        """Raw values -> int64 rows; unknown values and nulls -> ``OOV_ROW``."""
        raw = _as_kind(raw, self.kind)
        idx = pc.index_in(raw, value_set=self.values)
        return pc.fill_null(idx, OOV_ROW).to_numpy(zero_copy_only=False).astype(np.int64)

    def raw_values(self, rows) -> list:
        """The raw value of each row (None for the OOV row): for reports and debugging."""
        return self.values.take(pa.array(np.asarray(rows, np.int64))).to_pylist()


def keeps_rows(old: Vocabulary, new: Vocabulary) -> bool:
    """``new`` maps every value of ``old`` to the same row (it extends it, or is it): what a
    model trained on ``old`` needs of a later dataset to reuse its rows."""
    return new.kind == old.kind and new.size >= old.size and new.values.slice(0, old.size).equals(old.values)


def save_vocabularies(directory: str, vocabs: dict) -> str:
    """Write ``vocabs`` ({table: Vocabulary}) under ``DIR/_vocab``; returns the index path."""
    root = fs.join(directory, VOCAB_DIR)
    fs.make_dirs(root)
    index = {"format": VOCAB_FORMAT, "tables": {}}
    for name, v in sorted(vocabs.items()):
        file = f"{name}.parquet"
        with fs.open_output_stream(fs.join(root, file)) as out:
            pq.write_table(pa.table({"value": v.values}), out)
        index["tables"][name] = {"kind": v.kind, "size": v.size, "oov_row": OOV_ROW, "version": v.version,
                                 "previous": v.previous, "file": file}
    path = fs.join(root, VOCAB_FILE)
    fs.write_text_atomic(path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def load_vocabularies(directory: str) -> dict:
    """``{table: Vocabulary}`` of a dataset; ``{}`` when it keeps none (integer ids as rows)."""
    path = fs.join(directory, VOCAB_DIR, VOCAB_FILE)
    if fs.file_info(path).type == pafs.FileType.NotFound:
        return {}
    try:
        index = json.loads(fs.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not a vocabulary index ({exc})", file=path) from None
    if index.get("format") != VOCAB_FORMAT:
        raise DataError(f"vocabulary format {index.get('format')!r}; this gmeta reads {VOCAB_FORMAT}", file=path)
    out = {}
    for name, entry in index["tables"].items():
        file = fs.join(directory, VOCAB_DIR, entry["file"])
        with fs.open_input_file(file) as f:
            values = pq.read_table(f).column("value").combine_chunks()
        v = Vocabulary(name, entry["kind"], values.cast(KINDS[entry["kind"]]), previous=entry.get("previous"))
        if v.size != entry["size"] or v.version != entry["version"]:
            raise DataError(f"vocabulary of table {name} does not match its index (size {v.size} vs "
                            f"{entry['size']}): the dataset was modified after conversion", file=file)
        out[name] = v
    return out
