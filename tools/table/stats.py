"""Per-key facts gathered while the events stream by (pass 1): how many events each task has and
when each task or item was first seen, in memory proportional to the distinct keys, not the rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gmeta.io.vocab import MERGE_MIN, reduce_by_key


@dataclass(frozen=True)
class KeyTable:
    """Distinct keys, sorted, with their event count and first order value."""

    keys: pa.Array
    count: np.ndarray
    first: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys) -> np.ndarray:
        """Position of each key in ``keys`` (-1 for one not there)."""
        idx = pc.index_in(keys, value_set=self.keys)
        return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


class KeyStats:
    """Count and minimum order value per key over a stream of batches."""

    def __init__(self):
        self._parts = []
        self._pending = 0
        self._merged_size = 0

    def add(self, keys: pa.Array, order: np.ndarray) -> None:
        uniq, (count,), (first,) = reduce_by_key(keys, sums=[np.ones(len(order), np.int64)], mins=[order])
        self._parts.append((uniq, count, first))
        self._pending += len(uniq)
        if self._pending >= max(self._merged_size, MERGE_MIN):   # merge cost stays proportional to the keys
            self._parts = [self._merged()]

    def _merged(self) -> tuple:
        if len(self._parts) > 1:
            keys = pa.concat_arrays([p[0] for p in self._parts])
            count, first = (np.concatenate([p[k] for p in self._parts]) for k in (1, 2))
            uniq, (count,), (first,) = reduce_by_key(keys, sums=[count], mins=[first])
            self._parts = [(uniq, count, first)]
        self._pending, self._merged_size = 0, len(self._parts[0][0])
        return self._parts[0]

    def finish(self) -> KeyTable:
        if not self._parts:
            return KeyTable(pa.array([], pa.int64()), np.zeros(0, np.int64), np.zeros(0, np.int64))
        keys, count, first = self._merged()
        order = pc.sort_indices(keys)
        return KeyTable(keys.take(order), count[order.to_numpy()], first[order.to_numpy()])
