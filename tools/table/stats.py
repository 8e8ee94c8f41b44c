"""Per-key facts gathered while the events stream by (pass 1): how many events each task has,
when each task or item was first seen and, for a cold rule ranked ``by`` a column, that column's
largest value per key; in memory proportional to the distinct keys, not the rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gmeta.io.vocab import MERGE_MIN, reduce_by_key


@dataclass(frozen=True)
class KeyTable:
    """Distinct keys, sorted, with their event count, first order value and largest ``by`` value
    (-inf where the column is null; None when no rule ranks by a column)."""

    keys: pa.Array
    count: np.ndarray
    first: np.ndarray
    by: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys) -> np.ndarray:
        """Position of each key in ``keys`` (-1 for one not there)."""
        idx = pc.index_in(keys, value_set=self.keys)
        return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


class KeyStats:
    """Count, minimum order value and (optionally) maximum ``by`` value per key over a stream of
    batches; the maximum is kept as the minimum of the negated values."""

    def __init__(self):
        self._parts = []
        self._pending = 0
        self._merged_size = 0

    def add(self, keys: pa.Array, order: np.ndarray, by: Optional[np.ndarray] = None) -> None:
        mins = [order] if by is None else [order, -by]
        uniq, (count,), mins = reduce_by_key(keys, sums=[np.ones(len(order), np.int64)], mins=mins)
        self._parts.append((uniq, count, *mins))
        self._pending += len(uniq)
        if self._pending >= max(self._merged_size, MERGE_MIN):   # merge cost stays proportional to the keys
            self._parts = [self._merged()]

    def _merged(self) -> tuple:
        if len(self._parts) > 1:
            keys = pa.concat_arrays([p[0] for p in self._parts])
            count, *mins = (np.concatenate([p[k] for p in self._parts]) for k in range(1, len(self._parts[0])))
            uniq, (count,), mins = reduce_by_key(keys, sums=[count], mins=mins)
            self._parts = [(uniq, count, *mins)]
        self._pending, self._merged_size = 0, len(self._parts[0][0])
        return self._parts[0]

    def finish(self) -> KeyTable:
        if not self._parts:
            return KeyTable(pa.array([], pa.int64()), np.zeros(0, np.int64), np.zeros(0, np.int64))
        keys, count, first, *by = self._merged()
        order = pc.sort_indices(keys)
        idx = order.to_numpy()
        return KeyTable(keys.take(order), count[idx], first[idx], -by[0][idx] if by else None)
