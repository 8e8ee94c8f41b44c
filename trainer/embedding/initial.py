"""Deterministic embedding initial values that do not depend on how the table is sharded.

Every row's value is a pure function of ``(seed, table name, global row)``: a counter-based
hash (splitmix64) gives uniform bits per element, Box-Muller turns them into N(0, stddev^2).
So a 1-, 2- or 3-worker run, the replicated baseline and the SOK backend all start from the
same global table, which is what makes distributed == single-process comparisons possible.
Only the rows a rank owns are ever computed on that rank.
"""

from __future__ import annotations

import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_CHUNK_ROWS = 1 << 15


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _table_key(seed: int, table: str) -> np.uint64:
    with np.errstate(over="ignore"):
        a = _mix(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        return _mix(np.array([a ^ np.uint64(zlib.crc32(table.encode("utf-8")))], np.uint64))[0]


def initial_rows(seed: int, table: str, rows, dim: int, stddev: float) -> np.ndarray:
    """Initial float32 values ``[len(rows), dim]`` of global ``rows`` of ``table``."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((rows.size, int(dim)), dtype=np.float32)
    key = _table_key(seed, table)
    cols = np.arange(int(dim), dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        for start in range(0, rows.size, _CHUNK_ROWS):  # chunks bound temporary memory
            r = rows[start:start + _CHUNK_ROWS].astype(np.uint64)
            row_key = _mix(key ^ _mix(r))[:, None]
            bits = _mix(row_key + cols * _GOLDEN)
            # two 32-bit uniforms in (0, 1) per element
            u1 = ((bits >> np.uint64(32)).astype(np.float64) + 0.5) / 4294967296.0
            u2 = ((bits & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) / 4294967296.0
            z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
            out[start:start + r.size] = (z * float(stddev)).astype(np.float32)
    return out
