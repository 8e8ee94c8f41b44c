"""The disk side of the external group-by: rows go to one of P temporary Arrow IPC files by a
hash of their task, so every task lies whole in one file and one file fits in memory.

How ``--memory-mb`` M is spent (``MemoryPlan``; the numbers measured on this code):
  reading    pass 1 reads CSV in blocks of M/512 (pyarrow's streaming CSV reader holds 25-60
             blocks at once) or Parquet/ORC in batches of as many rows: ``READ_BLOCKS`` blocks;
  writing    the open ORC files' buffers (liborc's own memory, about 10 MB per split written):
             ``WRITER_RESERVE``;
  a partition  the rest, less what the vocabularies and per-task facts take in pass 2: working
             on one partition (sorting, taking, mapping ids, the writer's checks) costs about
             ``WORK_FACTOR`` times its bytes.
P = ceil(WORK_FACTOR x estimated bytes / the rest); in pass 2 a partition larger than its share
(a skewed hash, a low estimate, a large state) is split again with another hash first. What does
not grow with the input (the interpreter, pyarrow, thread pools) is outside M.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gmeta.tools.common import group_arange

WORK_FACTOR = 6.0
READ_BLOCKS = 64
WRITER_RESERVE = 32 * (1 << 20)
MAX_PARTITIONS = 256          # open files at once in pass 1; larger inputs are split again in pass 2
MIB = 1 << 20
M_MMAP_THRESHOLD = -3   # glibc's mallopt parameter
MMAP_THRESHOLD = 192 * 1024   # measured: 128 KiB makes liborc's list writer 5x slower, 256 KiB adds 10 MB
_MIX1, _MIX2, _PRIME = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x100000001B3)
IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def hash_keys(keys: pa.Array, salt: int) -> np.ndarray:
    """A 64-bit hash of each key (int64 or non-null string), the same in every batch and run."""
    if pa.types.is_integer(keys.type):
        x = keys.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64)
        return _splitmix(x ^ np.uint64(salt * 0x632BE59BD9B4E019 % (1 << 64)))
    keys = keys.cast(pa.string())
    offsets = np.frombuffer(keys.buffers()[1], np.int32)[keys.offset:keys.offset + len(keys) + 1]
    data = np.frombuffer(keys.buffers()[2], np.uint8) if keys.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets).astype(np.int64)
    body = data[offsets[0]:offsets[-1]].astype(np.uint64)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(max(int(lengths.max(initial=0)), 1), _PRIME, np.uint64))
        terms = body * powers[group_arange(lengths)]
        sums = np.zeros(len(keys), np.uint64)
        nonempty = lengths > 0
        if body.size:
            starts = (offsets[:-1] - offsets[0])[nonempty]
            sums[nonempty] = np.add.reduceat(terms, starts)
        return _splitmix(sums ^ _splitmix(lengths.astype(np.uint64) + np.uint64(salt)))


@dataclass(frozen=True)
class MemoryPlan:
    """M split into pass 1's reading (``batch_bytes`` blocks or ``batch_rows`` rows), the
    writers' reserve and ``budget``: what one partition's work and pass 2's state may take."""

    memory_mb: int
    batch_bytes: int
    batch_rows: int
    budget: float

    @classmethod
    def of(cls, memory_mb: int) -> "MemoryPlan":
        total = memory_mb * MIB
        batch_bytes = int(min(MIB, max(64 * 1024, total / 512)))
        batch_rows = int(min(65536, max(1024, batch_bytes // 32)))
        return cls(memory_mb, batch_bytes, batch_rows, total - READ_BLOCKS * batch_bytes - WRITER_RESERVE)

    @property
    def buffer_bytes(self) -> int:
        """Rows pass 1 gathers before writing them out by partition (inside the reading share)."""
        return READ_BLOCKS * self.batch_bytes // 4

    def partition_limit(self, state_bytes: float) -> float:
        """Bytes of one partition (as written) whose work fits what the budget leaves beside
        ``state_bytes`` (the vocabularies and per-task facts pass 2 keeps); at least M/16."""
        return max(self.budget - state_bytes, self.memory_mb * MIB / 16) / WORK_FACTOR


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


LIBC = _libc()


def return_freed_memory() -> None:
    """Make freed batches go back to the OS, so the process's size follows what it holds: Arrow
    allocates through malloc, and glibc's mmap threshold stays at 192 KiB (it otherwise rises
    after the first large free, and later batches pile up in a heap that never shrinks: measured
    +30 MB over a conversion). Process-wide, so only ``gmeta convert table``'s main calls it."""
    pa.set_memory_pool(pa.system_memory_pool())
    if hasattr(LIBC, "mallopt"):   # glibc; elsewhere the allocator's own policy stands
        LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    """Hand the heap's free pages back (glibc ``malloc_trim``), between passes and partitions."""
    pa.default_memory_pool().release_unused()
    if hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def choose_partitions(estimated_bytes: float, budget_bytes: float) -> int:
    """Enough partitions that one partition's work fits the budget, with a fifth to spare for
    an uneven hash and the state pass 2 keeps."""
    return max(1, math.ceil(WORK_FACTOR * estimated_bytes / max(0.8 * budget_bytes, 1.0)))


class Partitioner:
    """P IPC stream files under ``directory``; ``write`` sends each row to ``hash(task) % P``.
    Rows wait in memory until ``buffer_bytes`` have come, then go out as one piece per
    partition, so pieces stay large however many partitions there are."""

    def __init__(self, directory: str, n: int, schema: pa.Schema, task_column: str, salt: int = 0,
                 buffer_bytes: int = 8 * MIB):
        self.n, self.salt, self.task_column, self.buffer_bytes = int(n), int(salt), task_column, int(buffer_bytes)
        self.paths = [os.path.join(directory, f"part-{salt}-{k:04d}.arrow") for k in range(self.n)]
        self._sinks = [pa.OSFile(p, "wb") for p in self.paths]
        self._writers = [pa.ipc.new_stream(s, schema, options=IPC_OPTIONS) for s in self._sinks]
        self.rows = np.zeros(self.n, np.int64)
        self.bytes = np.zeros(self.n, np.int64)
        self._pending, self._pending_bytes = [], 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_bytes += batch.nbytes
        if self._pending_bytes >= self.buffer_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending).combine_chunks()
        self._pending, self._pending_bytes = [], 0
        part = (hash_keys(table.column(self.task_column).chunk(0), self.salt) % np.uint64(self.n)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        counts = np.bincount(part, minlength=self.n)
        grouped = table.take(pa.array(order))
        del table
        start = 0
        for k in np.flatnonzero(counts):          # one piece per partition this buffer touches
            piece = grouped.slice(start, int(counts[k]))
            self._writers[k].write_table(piece)
            self.rows[k] += piece.num_rows
            self.bytes[k] += piece.nbytes
            start += int(counts[k])

    def close(self) -> list:
        """``[(path, rows, bytes in memory)]`` of every partition."""
        self._flush()
        for w, s in zip(self._writers, self._sinks):
            w.close()
            s.close()
        return list(zip(self.paths, self.rows.tolist(), self.bytes.tolist()))


def read_partition(path: str) -> pa.Table:
    with pa.OSFile(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all()


def split_again(path: str, n: int, directory: str, task_column: str, salt: int, buffer_bytes: int) -> list:
    """Re-partition one partition file batch by batch with another hash; removes it."""
    with pa.OSFile(path, "rb") as f:
        reader = pa.ipc.open_stream(f)
        sub = Partitioner(directory, n, reader.schema, task_column, salt, buffer_bytes)
        for batch in reader:
            sub.write(batch)
    os.remove(path)
    return sub.close()
