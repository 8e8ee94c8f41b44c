"""Task-grouped ORC writer: the one way Meta-IO files are made.

Guarantees the reader relies on: every task's rows are contiguous and inside ONE stripe of ONE
file, and every file has exactly the arrow schema implied by ``schema.json``.

How stripes are controlled. liborc cuts a stripe only at the end of an ``add()`` of a row batch,
once its size estimate passes ``stripe_size``; pyarrow's ``ORCWriter`` adds a table in batches of
``batch_size`` rows. So whole tasks are buffered until about ``rows_per_stripe`` rows, and each
buffer is written as one table no longer than ``batch_size`` with a 1-byte ``stripe_size``: every
write is one ``add()`` and may end a stripe, and no stripe boundary can fall inside a task. With
compression the estimate counts only compressed blocks already emitted, so a small buffer can
merge into the next stripe (still whole tasks); the compression block size is scaled down for
small stripes so a buffer of ``rows_per_stripe`` rows normally is one stripe. The true layout is
read back from each finished file (task and flag columns only, by ``gmeta.io.index.scan_file``,
the scanner the reader's plan uses too) and checked before it goes into ``_index.json``.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc

from gmeta.io import fs
from gmeta.io.errors import DataError
from gmeta.io.index import INDEX_FILE, INDEX_FORMAT, INDEX_VERSION, index_text, scan_file
from gmeta.io.schema import SCHEMA_FILE, Schema, SchemaError
from gmeta.io.validate import (
    arrow_schema,
    check_finite,
    check_id_values,
    check_ids,
    check_labels,
    check_no_nulls,
    check_query_flags,
    check_tasks_disjoint,
    task_runs,
)

COMPRESSIONS = ("uncompressed", "snappy", "zlib", "lz4", "zstd")


def compression_block_size(rows_per_stripe: int) -> int:
    """About half a float32 column of one stripe (64 B .. 64 KiB): a stripe buffer that is at
    least half full then always emits a compressed block, so it is cut as its own stripe."""
    return int(min(65536, max(64, 2 ** int(math.log2(max(1, 2 * rows_per_stripe))))))


def write_dataset_schema(dataset_dir: str, schema: Schema) -> str:
    """Write ``DIR/schema.json`` (same as ``schema.save``)."""
    return schema.validate(f"{dataset_dir}/{SCHEMA_FILE}").save(dataset_dir)


class _SortedIdSet:
    """Task ids already written, as a few sorted runs merged like a binary counter, so checking
    and adding k ids costs O(k log n) numpy work and 8 bytes per id."""

    def __init__(self):
        self._runs = []

    def first_common(self, ids_sorted: np.ndarray) -> Optional[int]:
        for run in self._runs:
            idx = np.minimum(np.searchsorted(run, ids_sorted), run.size - 1)
            hit = run[idx] == ids_sorted
            if hit.any():
                return int(ids_sorted[hit][0])
        return None

    def add(self, ids_sorted: np.ndarray) -> None:
        run = ids_sorted
        while self._runs and self._runs[-1].size <= run.size:
            run = np.union1d(self._runs.pop(), run)
        self._runs.append(run)


class TaskWriter:
    """Write task-grouped tables into ``DIR/<split>/part-NNNNN.orc`` plus ``_index.json``.

    ``write(table)`` takes a pyarrow Table holding every schema column, rows grouped by task, and
    all of a task's rows inside that one call (a call may hold many tasks). Columns are cast to
    the schema's types (int64 ids, int8 flag, float32 floats, list<int64> lists); a cast that
    loses information is refused. ``schema.json`` itself is not written here (see
    ``write_dataset_schema``), so a half-written dataset is never mistaken for a finished one.
    """

    def __init__(self, dataset_dir: str, schema: Schema, split: str = "train", rows_per_stripe: int = 65536,
                 rows_per_file: int = 1_000_000, compression: str = "zstd", overwrite: bool = False,
                 file_prefix: str = "part"):
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a gmeta.io.schema.Schema, got {type(schema).__name__}")
        schema.validate("TaskWriter schema")
        if split not in schema.splits:
            raise ValueError(f"split {split!r} is not listed in the schema's splits {list(schema.splits)}")
        if int(rows_per_stripe) < 1 or int(rows_per_file) < 1:
            raise ValueError(f"rows_per_stripe ({rows_per_stripe}) and rows_per_file ({rows_per_file}) "
                             f"must be >= 1")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of {COMPRESSIONS}")
        if not file_prefix or "/" in file_prefix or file_prefix[0] in "._":
            raise ValueError(f"file_prefix {file_prefix!r} must be a plain name not starting with '.' or '_'")
        self.schema = schema
        self.split = split
        self.rows_per_stripe = int(rows_per_stripe)
        self.rows_per_file = int(rows_per_file)
        self.compression = compression
        self.file_prefix = file_prefix
        self.dataset_dir = dataset_dir
        self.split_dir = fs.join(dataset_dir, split)
        self._arrow_schema = arrow_schema(schema)
        self._limits = {f.name: schema.table(f.table) for f in schema.sparse}
        self._check_existing(overwrite)
        fs.make_dirs(self.split_dir)

        self._seen = _SortedIdSet()
        self._calls = 0
        self._pending = []          # slices of validated tables, whole tasks, not yet written
        self._pending_rows = 0
        self._file = None           # (final path, tmp path, stream, ORCWriter, batch_size)
        self._file_rows = 0
        self._files = []            # index entries of finished files
        self._closed = False
        self.index = None

    # ------------------------------------------------------------------ public API
    def write(self, table: Union[pa.Table, pa.RecordBatch]) -> None:
        """Validate ``table`` and buffer its tasks; full stripes are written as they fill."""
        if self._closed:
            raise RuntimeError(f"TaskWriter for {self.split_dir} is closed")
        self._calls += 1
        where = f"{self.split_dir} (write() call {self._calls})"
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise TypeError(f"{where}: expected a pyarrow.Table, got {type(table).__name__}")
        table = self._conform(table, where)
        if table.num_rows == 0:
            return
        starts = self._validate(table, where)
        self._buffer(table, starts)

    def close(self) -> dict:
        """Write the last stripe, finish the file and write ``_index.json`` atomically."""
        if self._closed:
            return self.index
        if self._pending_rows:
            self._emit(self._take_pending())
        self._finish_file()
        self._closed = True
        self.index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "split": self.split,
                      "rows": int(sum(f["rows"] for f in self._files)),
                      "tasks": int(sum(f["tasks"] for f in self._files)),
                      "files": self._files}
        fs.write_text_atomic(fs.join(self.split_dir, INDEX_FILE), index_text(self.index))
        return self.index

    def abort(self) -> None:
        """Drop the unfinished file and write no index (finished files stay; the reader scans them)."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            _, tmp, stream, writer, _ = self._file
            self._file = None
            try:
                writer.close()
                stream.close()
            finally:
                fs.delete_file(tmp)

    @property
    def files(self) -> list:
        """Paths of the finished ORC files so far."""
        return [fs.join(self.split_dir, f["name"]) for f in self._files]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    # ------------------------------------------------------------------ validation
    def _check_existing(self, overwrite: bool) -> None:
        schema_path = fs.join(self.dataset_dir, SCHEMA_FILE)
        if fs.file_info(schema_path).type != fs.pafs.FileType.NotFound:
            try:
                existing = Schema.load(self.dataset_dir)
            except SchemaError as exc:
                raise DataError(f"existing schema file is unreadable: {exc}", file=schema_path) from None
            if existing != self.schema:
                raise DataError("the dataset already has a different schema.json; write to a new "
                                "directory or remove it first", file=schema_path)
        try:
            entries = fs.list_dir(self.split_dir)
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise DataError("exists and is not a directory", file=self.split_dir) from None
        ours = [e for e in entries if e.base_name.endswith(".orc") or e.base_name.endswith(".orc.tmp")
                or e.base_name in (INDEX_FILE, f".{INDEX_FILE}.tmp")]
        if ours and not overwrite:
            raise DataError(f"already holds {len(ours)} Meta-IO file(s) ({ours[0].base_name}, ...); pass "
                            f"overwrite=True or choose an empty directory", file=self.split_dir)
        for e in ours:
            fs.delete_file(fs.join(self.split_dir, e.base_name))

    def _conform(self, table: pa.Table, where: str) -> pa.Table:
        """Select the schema columns in canonical order and cast them to the canonical types."""
        names = set(table.column_names)
        expected = self._arrow_schema.names
        for name in expected:
            if name not in names:
                raise DataError(f"column is missing; the table has {table.column_names}", file=where, column=name)
        extra = sorted(names - set(expected))
        if extra:
            raise DataError(f"columns not in schema.json: {extra}", file=where, column=extra[0])
        if len(table.column_names) != len(names):
            raise DataError(f"duplicate column names in {table.column_names}", file=where)
        columns = []
        for field in self._arrow_schema:
            col = table.column(field.name)
            if col.type != field.type:
                try:
                    col = col.cast(field.type, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                    raise DataError(f"cannot store {col.type} as {field.type}: {exc}", file=where,
                                    column=field.name) from None
            columns.append(col)
        return pa.Table.from_arrays(columns, schema=self._arrow_schema)

    def _validate(self, table: pa.Table, where: str) -> np.ndarray:
        """Vectorized checks of one write() call; returns the row offsets where tasks start."""
        s = self.schema
        check_no_nulls({n: table.column(n) for n in table.column_names}, where)
        task_ids = _numpy(table.column(s.task_column))
        starts, ids = task_runs(task_ids, where, column=s.task_column)
        ids_sorted = np.sort(ids)
        dup = self._seen.first_common(ids_sorted)
        if dup is not None:
            raise DataError(f"task {dup} was already written by an earlier write() call; all rows of a "
                            f"task must be passed in one write() call", file=where, column=s.task_column)
        check_query_flags(_numpy(table.column(s.query_column)), where, column=s.query_column)
        for name in list(s.labels) + [d.name for d in s.dense]:
            check_finite(_numpy(table.column(name))[:, None], [name], where)
        for name in s.labels:
            check_labels(_numpy(table.column(name))[:, None], [name], where)
        for f in s.sparse:
            spec = self._limits[f.name]
            if f.is_list:
                values = _numpy(table.column(f.name).combine_chunks().flatten())
                check_id_values(values, f.name, spec.num_rows, spec.hashed, where)
            else:
                check_ids(_numpy(table.column(f.name))[:, None], [f.name], np.array([spec.num_rows]),
                          np.array([spec.hashed]), where, reduce_hashed=False)
        self._seen.add(ids_sorted)
        return starts

    # ------------------------------------------------------------------ stripes and files
    def _buffer(self, table: pa.Table, starts: np.ndarray) -> None:
        """Cut ``table`` at task boundaries into stripes of at most rows_per_stripe rows (a single
        larger task becomes its own stripe) and write every stripe that is full."""
        n = table.num_rows
        ends = np.append(starts[1:], n)  # possible cut points, ascending
        pos = 0
        while pos < n:
            room = self.rows_per_stripe - self._pending_rows
            if n - pos < room:
                self._pending.append(table.slice(pos))
                self._pending_rows += n - pos
                return
            k = int(np.searchsorted(ends, pos + room, side="right")) - 1
            if k >= 0 and ends[k] > pos:
                cut = int(ends[k])
            elif self._pending_rows:
                self._emit(self._take_pending())
                continue
            else:  # one task longer than a stripe: it becomes a stripe of its own
                cut = int(ends[np.searchsorted(ends, pos, side="right")])
            self._pending.append(table.slice(pos, cut - pos))
            self._pending_rows += cut - pos
            self._emit(self._take_pending())
            pos = cut

    def _take_pending(self) -> pa.Table:
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        return table

    def _emit(self, stripe: pa.Table) -> None:
        """Write one buffer of whole tasks as ONE add() (rows <= the file's batch_size)."""
        rows = stripe.num_rows
        if self._file is not None and (self._file_rows + rows > self.rows_per_file or rows > self._file[4]):
            self._finish_file()
        if self._file is None:
            self._open_file(max(self.rows_per_stripe, rows))
        self._file[3].write(stripe)
        self._file_rows += rows

    def _open_file(self, batch_size: int) -> None:
        name = f"{self.file_prefix}-{len(self._files):05d}.orc"
        path = fs.join(self.split_dir, name)
        tmp = fs.join(self.split_dir, f".{name}.tmp")
        stream = fs.open_output_stream(tmp)
        writer = orc.ORCWriter(stream, batch_size=batch_size, stripe_size=1, compression=self.compression,
                               compression_block_size=compression_block_size(self.rows_per_stripe))
        self._file = (path, tmp, stream, writer, batch_size)
        self._file_rows = 0

    def _finish_file(self) -> None:
        if self._file is None:
            return
        path, tmp, stream, writer, _ = self._file
        self._file = None
        writer.close()
        stream.close()
        fs.move(tmp, path)
        self._files.append(self._read_back(path, self._file_rows))

    def _read_back(self, path: str, rows_written: int) -> dict:
        """The file's real stripe layout (task and flag columns only), checked against the rules."""
        stripes, ids = scan_file(path, self.schema)
        check_tasks_disjoint(ids, [(path, i) for i in range(len(stripes))], self.schema.task_column)
        rows = sum(e["rows"] for e in stripes)
        if rows != rows_written:
            raise DataError(f"read back {rows} rows but {rows_written} were written", file=path)
        return {"name": path.rsplit("/", 1)[-1], "bytes": int(fs.file_info(path).size), "rows": int(rows),
                "tasks": int(sum(e["tasks"] for e in stripes)), "stripes": stripes}


def write_dataset(dataset_dir: str, schema: Schema, splits: Mapping[str, Union[pa.Table, Iterable[pa.Table]]],
                  **writer_options) -> dict:
    """Write every split (a Table, or an iterable of Tables each holding whole tasks), then
    ``schema.json`` last. Returns ``{split: index}``."""
    indexes = {}
    for split, tables in splits.items():
        if isinstance(tables, (pa.Table, pa.RecordBatch)):
            tables = [tables]
        with TaskWriter(dataset_dir, schema, split=split, **writer_options) as writer:
            for table in tables:
                writer.write(table)
        indexes[split] = writer.index
    write_dataset_schema(dataset_dir, schema)
    return indexes


def _numpy(arr) -> np.ndarray:
    """A column as numpy (zero-copy for a single chunk of fixed-width values without nulls)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    return arr.to_numpy(zero_copy_only=False)
