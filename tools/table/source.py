"""The inputs of ``gmeta convert table``: event files or directories and side tables in Parquet,
ORC or CSV, local or ``hdfs://`` (``gmeta.io.fs.resolve``), read through ``pyarrow.dataset``.
Events stream file by file in record batches (by the format's own streaming reader: see
``EventFiles.batches``) that carry their first row number, so every error can name the file, the
column and the row; side tables are small and read whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.orc as orc
import pyarrow.parquet as pq

from gmeta.io import fs
from gmeta.io.errors import DataError
from gmeta.tools.table.spec import EXTENSIONS, FORMATS, Derive, Join, SpecError, resolve_path

#: what each use of a column accepts (a predicate on the arrow type) and how to say it
USES = {
    "task": (lambda t: _is_id(t), "string or integer ids"),
    "order": (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_timestamp(t)
              or pa.types.is_date(t) or _is_string(t), "numbers, timestamps or timestamp strings"),
    "tie": (lambda t: not pa.types.is_nested(t), "numbers, strings or timestamps"),
    "label": (lambda t: _is_number(t), "numbers or booleans"),
    "query": (lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t), "0/1 integers or booleans"),
    "split": (lambda t: _is_string(t), "split names (strings)"),
    "id": (lambda t: _is_id(t) or (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_id(t.value_type),
           "string or integer ids, or lists of them"),
    "delimited": (lambda t: _is_string(t), "strings to split on the delimiter"),
    "dense": (lambda t: _is_number(t), "numbers"),
    "derive": (lambda t: _is_string(t) or _is_number(t), "strings (a regex reads them) or numbers (buckets)"),
    "by": (lambda t: _is_number(t) or pa.types.is_timestamp(t) or pa.types.is_date(t),
           "numbers or dates (a cold rule ranks by them)"),
    "key": (lambda t: _is_id(t), "string or integer keys"),
}
SAMPLE_BYTES = 1 << 20


def _is_string(t) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or (pa.types.is_dictionary(t) and _is_string(t.value_type)))


def _is_id(t) -> bool:
    return _is_string(t) or pa.types.is_integer(t)


def _is_number(t) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def check_type(t: pa.DataType, use: str, file: str, column: str) -> None:
    ok, expected = USES[use]
    if not ok(t):
        raise DataError(f"type {t} cannot be used as {use}: expected {expected} (fix the column or the spec)",
                        file=file, column=column)


# ---------------------------------------------------------------------------------- datasets
def _display(original: str, inner: str) -> str:
    """A file's name as the user wrote its location (scheme and host kept for hdfs://)."""
    if fs.is_remote(original):
        u = urlparse(original)
        return f"{u.scheme}://{u.netloc}{inner}"
    return inner


def list_files(path: str, fmt: str) -> tuple:
    """(format, [(display name, inner path)], filesystem) of a file or a directory (recursively;
    names starting with '.' or '_' skipped; only files of the format's extensions)."""
    filesystem, inner = fs.resolve(path)
    info = filesystem.get_file_info(inner)
    if info.type == fs.pafs.FileType.NotFound:
        raise SpecError(f"input {path!r} does not exist")
    if info.type == fs.pafs.FileType.File:
        found = fmt or EXTENSIONS.get(os.path.splitext(inner)[1].lower())
        if found is None:
            raise SpecError(f"input {path!r}: cannot tell the format from the extension; give --format "
                            f"(spec: format) as one of {FORMATS}")
        return found, [(_display(path, inner), inner)], filesystem
    entries = filesystem.get_file_info(fs.pafs.FileSelector(inner, recursive=True))
    files = sorted(e.path for e in entries if e.type == fs.pafs.FileType.File
                   and not any(p.startswith((".", "_")) for p in os.path.relpath(e.path, inner).split("/")))
    by_format = {}
    for f in files:
        kind = EXTENSIONS.get(os.path.splitext(f)[1].lower())
        if kind and not f.endswith(".txt"):
            by_format.setdefault(kind, []).append(f)
    if fmt:
        chosen = by_format.get(fmt, [])
    elif len(by_format) == 1:
        fmt, chosen = next(iter(by_format.items()))
    elif by_format:
        raise SpecError(f"input {path!r} holds files of several formats {sorted(by_format)}; give --format")
    else:
        chosen = []
    if not chosen:
        raise SpecError(f"input {path!r}: no {fmt or 'Parquet, ORC or CSV'} files in the directory")
    return fmt, [(_display(path, f), f) for f in chosen], filesystem


def file_format(fmt: str, delimiter: str, string_columns=(), block_size: int = 1 << 20):
    """The ``pyarrow.dataset`` format; CSV reads ``string_columns`` (the order column, delimited
    lists, regex sources) as text, parsed by us so that a bad value is reported with its row and
    a first block without delimiters does not make a list column numeric."""
    if fmt != "csv":
        return fmt
    return ds.CsvFileFormat(
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns}),
        read_options=pacsv.ReadOptions(block_size=int(block_size)))


def wrap_arrow_error(exc: Exception, file: str, names=()) -> DataError:
    """A pyarrow read or conversion failure as a DataError naming the file (and the column when
    the message gives its number, as CSV conversion errors do)."""
    text = str(exc).strip().splitlines()[0]
    column = None
    if "CSV column #" in text:
        try:
            column = names[int(text.split("CSV column #", 1)[1].split(":", 1)[0])]
        except (ValueError, IndexError):
            column = None
    return DataError(f"cannot read: {text} (a value of another type than the first rows'? fix the value, or "
                     f"for an id column give it as strings)", file=file, column=column)


@dataclass
class Fragment:
    name: str                  # for messages
    fragment: object           # pyarrow.dataset.FileFragment
    schema: pa.Schema          # its physical schema


class EventFiles:
    """The event files: their fragments, size, a row estimate and a batch stream."""

    def __init__(self, inputs, fmt: str, delimiter: str, src: str, string_columns=(), block_size: int = 1 << 20):
        self.fragments, self.bytes = [], 0
        formats = set()
        for path in inputs:
            found, files, filesystem = list_files(resolve_path(path, src), fmt)
            formats.add(found)
            dataset = ds.dataset([inner for _, inner in files], filesystem=filesystem,
                                 format=file_format(found, delimiter, string_columns, block_size))
            for (name, _), frag in zip(files, dataset.get_fragments()):
                try:
                    schema = frag.physical_schema
                except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
                    raise wrap_arrow_error(exc, name) from None
                self.fragments.append(Fragment(name, frag, schema))
            self.bytes += sum(filesystem.get_file_info(inner).size for _, inner in files)
            self._filesystem = filesystem
        if len(formats) > 1:
            raise SpecError(f"inputs mix formats {sorted(formats)}; convert one format at a time")
        self.format = formats.pop()
        self.names = [f.name for f in self.fragments]
        self.delimiter, self.string_columns, self.block_size = delimiter, tuple(string_columns), int(block_size)

    def check(self, uses: dict) -> None:
        """Every file has every column (``{column: [use, ...]}``) with a type each use accepts."""
        for f in self.fragments:
            for column, column_uses in uses.items():
                idx = f.schema.get_field_index(column)
                if idx < 0:
                    raise DataError(f"column is missing; the file has {f.schema.names}", file=f.name, column=column)
                for use in column_uses:
                    check_type(f.schema.field(idx).type, use, f.name, column)

    def estimate_rows(self) -> int:
        """Rows of all files: from the metadata (Parquet, ORC), else the size over the mean line
        length of the first file's first MiB (CSV)."""
        if self.format != "csv":
            return int(sum(f.fragment.count_rows() for f in self.fragments))
        first = self.fragments[0].fragment
        with first.filesystem.open_input_stream(first.path) as stream:
            sample = stream.read(SAMPLE_BYTES)
        lines = max(sample.count(b"\n"), 1)
        return int(self.bytes / (len(sample) / lines)) + 1

    def batches(self, columns, batch_rows: int):
        """``(file name, first row (0-based), RecordBatch)`` of every file in order, read by the
        format's own streaming reader: the dataset scanner reads ahead without bound when its
        consumer is slower than the disk (measured: the whole of a 120 MB input buffered)."""
        for f in self.fragments:
            row = 0
            stream = self._stream(f, list(columns), int(batch_rows))
            while True:
                try:
                    batch = next(stream)
                except StopIteration:
                    break
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                    raise wrap_arrow_error(exc, f.name, f.schema.names) from None
                if batch.num_rows:
                    yield f.name, row, batch
                    row += batch.num_rows

    def _stream(self, f: Fragment, columns: list, batch_rows: int):
        filesystem, path = f.fragment.filesystem, f.fragment.path
        if self.format == "csv":
            reader = pacsv.open_csv(
                filesystem.open_input_stream(path), read_options=pacsv.ReadOptions(block_size=self.block_size),
                parse_options=pacsv.ParseOptions(delimiter=self.delimiter),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in self.string_columns
                                                                   if c in columns}, include_columns=columns))
            yield from reader
        elif self.format == "parquet":
            yield from pq.ParquetFile(filesystem.open_input_file(path)).iter_batches(batch_size=batch_rows,
                                                                                    columns=columns)
        else:
            stripes = orc.ORCFile(filesystem.open_input_file(path))
            for k in range(stripes.nstripes):
                stripe = stripes.read_stripe(k, columns=columns)
                yield from stripe.to_batches(max_chunksize=batch_rows) if isinstance(stripe, pa.Table) else \
                    pa.Table.from_batches([stripe]).to_batches(max_chunksize=batch_rows)


# ---------------------------------------------------------------------------------- side tables
@dataclass
class Side:
    """A side table read whole: ``table`` holds its key column first, unique."""

    join: Join
    name: str
    table: pa.Table

    @property
    def columns(self) -> list:
        return self.table.column_names[1:]

    def take(self, keys: pa.Array, columns) -> tuple:
        """The side columns of each event (nulls where its key is not in the table) and how many
        events found no row."""
        keys = _key_array(keys)
        side_keys = self.table.column(0).combine_chunks()
        if keys.type != side_keys.type:
            raise DataError(f"join key types differ: the events' {self.join.on!r} holds {keys.type}, this side "
                            f"table's {self.join.key_column!r} holds {side_keys.type}; store both as integers or "
                            f"both as strings", file=self.name, column=self.join.key_column)
        idx = pc.index_in(keys, value_set=side_keys)
        return {c: self.table.column(c).take(idx).combine_chunks() for c in columns}, idx.null_count


def _key_array(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values.cast(pa.int64() if pa.types.is_integer(values.type) else pa.string())


def load_side(join: Join, src: str, delimiter: str, derive=()) -> Side:
    """Read a side table whole (it is small: one row per item or user), check its key is there,
    of a key type and unique, and add the derived columns whose source it holds."""
    fmt, files, filesystem = list_files(resolve_path(join.path, src), join.format)
    name = files[0][0] if len(files) == 1 else resolve_path(join.path, src)
    key = join.key_column
    try:
        dataset = ds.dataset([inner for _, inner in files], filesystem=filesystem,
                             format=file_format(fmt, delimiter))
        schema = dataset.schema
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise wrap_arrow_error(exc, name) from None
    if key not in schema.names:
        raise DataError(f"join key column is missing; the side table has {schema.names}", file=name, column=key)
    check_type(schema.field(key).type, "key", name, key)
    wanted = list(join.columns) or [c for c in schema.names if c != key]
    sources = {d.column for d in derive if d.column in schema.names}
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        raise DataError(f"column is missing; the side table has {schema.names}", file=name, column=missing[0])
    try:
        table = dataset.to_table(columns=[key] + [c for c in dict.fromkeys(wanted + sorted(sources)) if c != key])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise wrap_arrow_error(exc, name, schema.names) from None
    keys = _key_array(table.column(key))
    if keys.null_count:
        row = int(np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"row {row + 1} has no key; every side-table row needs one", file=name, column=key)
    counts = pc.value_counts(keys)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise DataError(f"key {dup[0].as_py()!r} is listed {int(pc.max(counts.field('counts')).as_py())} times or "
                        f"more; a side table needs one row per key", file=name, column=key)
    table = table.set_column(0, key, keys)
    for d in derive:
        if d.column in table.column_names:
            check_type(table.schema.field(d.column).type, "derive", name, d.column)
            table = table.append_column(d.name, derive_column(table.column(d.column), d, name))
    return Side(join, name, table)


def derive_column(values, d: Derive, file: str) -> pa.Array:
    """The first regex group of each value (null where it does not match), as string or int;
    with ``buckets``, the bucket of each number (null stays null)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    found = values
    if d.regex:
        found = pc.struct_field(pc.extract_regex(values.cast(pa.string()), _named_first_group(d.regex)), "value")
    if d.buckets:
        try:
            x = found.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"derived column {d.name!r}: buckets need numbers: {exc}", file=file,
                            column=d.column) from None
        bucket = np.searchsorted(np.asarray(d.buckets, float), x.fill_null(0).to_numpy(zero_copy_only=False),
                                 side="right") + 1
        return pa.array(bucket.astype(np.int64), mask=x.is_null().to_numpy(zero_copy_only=False))
    if d.type == "int":
        try:
            return found.cast(pa.int64())
        except pa.ArrowInvalid as exc:
            raise DataError(f"derived column {d.name!r}: {exc}; make the regex group match digits only",
                            file=file, column=d.column) from None
    return found.cast(pa.string()) if d.regex else found


def _named_first_group(regex: str) -> str:
    """RE2 returns named groups only: name the first plain ``(`` group ``value``."""
    out, i, escaped = [], 0, False
    while i < len(regex):
        ch = regex[i]
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "(" and not regex.startswith("(?", i):
            return "".join(out) + "(?P<value>" + regex[i + 1:]
        elif regex.startswith("(?P<", i):
            name_end = regex.index(">", i)
            return "".join(out) + "(?P<value>" + regex[name_end + 1:]
        out.append(ch)
        i += 1
    return regex
