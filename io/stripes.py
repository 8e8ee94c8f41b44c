"""ORC files and stripes of a split: listing, opening and decoding, with errors as ``DataError``.

pyarrow's I/O failures become messages naming the file and stripe here, so the planner, the
reader, the writer's read-back and the column readers word them alike (the reader adds only
"file disappeared since the plan was made" for a file deleted under it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.orc as orc

from gmeta.io import fs
from gmeta.io.errors import DataError


def list_orc_files(split_dir: str) -> list:
    """``FileInfo`` of the split's ORC files (``*.orc``, not hidden), sorted by name; none, or an
    empty one, is an error."""
    try:
        entries = fs.list_dir(split_dir)
    except FileNotFoundError:
        raise DataError("split directory does not exist", file=split_dir) from None
    except NotADirectoryError:
        raise DataError("is not a directory", file=split_dir) from None
    except OSError as exc:
        raise DataError(f"cannot list directory: {exc}", file=split_dir) from None
    files = [e for e in entries if e.type == fs.pafs.FileType.File and e.base_name.endswith(".orc")
             and not e.base_name.startswith((".", "_"))]
    if not files:
        raise DataError("no ORC files (*.orc) in the split directory", file=split_dir)
    for e in files:
        if e.size == 0:
            raise DataError("empty file (0 bytes)", file=fs.join(split_dir, e.base_name))
    return files


def orc_paths(split_dir: str) -> list:
    """Full paths of the split's ORC files, in name order."""
    return [fs.join(split_dir, e.base_name) for e in list_orc_files(split_dir)]


@contextmanager
def open_orc(path: str, check=None) -> Iterator[orc.ORCFile]:
    """An ``ORCFile`` for ``path`` (closed on exit); an unreadable or row-less file is a DataError.
    ``check(file_schema, path)``, if given, runs before the row count is looked at."""
    try:
        handle = fs.open_input_file(path)
    except OSError as exc:
        raise DataError(f"cannot open: {exc}", file=path) from None
    with handle:
        try:
            reader = orc.ORCFile(handle)
            file_schema = reader.schema
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"not a readable ORC file (truncated or corrupt?): {exc}", file=path) from None
        if check is not None:
            check(file_schema, path)
        if reader.nrows == 0 or reader.nstripes == 0:
            raise DataError("empty file: no rows", file=path)
        yield reader


def read_stripe(reader: orc.ORCFile, path: str, stripe: int, columns: Optional[Sequence[str]] = None):
    """Stripe ``stripe`` of an open file as a RecordBatch (only ``columns``, if given)."""
    try:
        return reader.read_stripe(stripe, columns=None if columns is None else list(columns))
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot decode (truncated or corrupt?): {exc}", file=path, stripe=stripe) from None


def iter_stripes(paths: Sequence[str], columns: Sequence[str], check=None) -> Iterator[tuple]:
    """``(path, stripe, RecordBatch of columns)`` of every stripe of ``paths`` in order, one
    stripe in memory at a time. ``check`` as in ``open_orc``."""
    for path in paths:
        with open_orc(path, check) as reader:
            for i in range(reader.nstripes):
                yield path, i, read_stripe(reader, path, i, columns)


class OrcFileCache(threading.local):
    """Per-thread open ORC files, least recently used closed first (an ``ORCFile`` is not safe to
    share between threads, and reopening one per stripe would re-read its footer)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.files = OrderedDict()

    def get(self, path: str) -> orc.ORCFile:
        hit = self.files.get(path)
        if hit is not None:
            self.files.move_to_end(path)
            return hit[1]
        handle = fs.open_input_file(path)
        try:
            reader = orc.ORCFile(handle)
        except Exception:
            handle.close()
            raise
        self.files[path] = (handle, reader)
        if len(self.files) > self.size:
            old_handle, _ = self.files.popitem(last=False)[1]
            old_handle.close()
        return reader
