"""The sharding plan: which rank owns which embedding row, as plain data (no TF, no Horovod).

Placement is ONE rule, ``ShardingPlan.owner`` / ``ShardingPlan.local_row``: row ``r`` of every
table lives on rank ``r % N`` at local row ``r // N`` (the rule SOK uses), so rank ``k`` holds
``ceil((num_rows - k) / N)`` rows and hot rows (usually small ids) spread over all ranks. The
rule is written with ``%`` and ``//`` only, so the same function serves Python ints, numpy
arrays and TF tensors: the embedding backends ask the plan inside their traced lookups, the
benchmark and the tests ask it in numpy. ``global_rows`` / ``rows_on_rank`` are the rule's
inverse (tests check them against it). A different placement is a change to those functions.
The plan is built from the dataset schema in one call (``ShardingPlan.from_schema``).

``replicated`` names tables held whole by every rank instead (TorchRec's data-parallel tables):
a small table's lookup is then a local gather and its gradient rides the step's one fused
allreduce, which costs less than the AlltoAll round trip's latency and per-table work
(``from_schema`` picks the tables of at most ``replicate_under`` bytes). Such a table's rows are
all "held" by every rank (``global_rows``), and ``owner`` still names the one rank that writes
each row to a checkpoint, so checkpoints do not depend on the placement.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from gmeta.io.schema import find_named, id_rows

BYTES_PER_FLOAT = 4


def parse_bytes(text, flag: str) -> int:
    """A byte size such as ``64M``, ``1G``, ``500k`` or ``500000`` (>= 0); anything else is a
    ValueError naming ``flag``."""
    value = str(text).strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(value[-1:], 1)
    digits = value[:-1] if value[-1:] in ("k", "m", "g") else value
    try:
        size = int(float(digits) * scale)
    except ValueError:
        raise ValueError(f"{flag} must be a byte size such as 64M, 1G or 500000, got {text!r}") from None
    if size < 0:
        raise ValueError(f"{flag} must be >= 0 bytes, got {text!r}")
    return size


@dataclass(frozen=True)
class TableConfig:
    """One embedding table: ``num_rows`` x ``dim`` float32.

    ``hashed``: ids are reduced modulo ``num_rows`` (hash buckets); otherwise an id outside
    ``[0, num_rows)`` is an error. Negative ids always mean "no row" (padding).
    """

    name: str
    num_rows: int
    dim: int
    hashed: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"table name must be a non-empty string, got {self.name!r}")
        if int(self.num_rows) < 1:
            raise ValueError(f"table {self.name!r}: num_rows must be >= 1, got {self.num_rows}")
        if int(self.dim) < 1:
            raise ValueError(f"table {self.name!r}: dim must be >= 1, got {self.dim}")

    @property
    def param_bytes(self) -> int:
        return int(self.num_rows) * int(self.dim) * BYTES_PER_FLOAT

    def rows_of(self, ids):
        """Non-negative ids -> rows of this table (the schema's one id rule: modulo if hashed)."""
        return id_rows(ids, self.num_rows, self.hashed)


@dataclass(frozen=True)
class ShardingPlan:
    """Row-wise placement of every table over ``world_size`` ranks.

    ``feature_tables`` is stored as a sorted tuple of ``(feature, table)`` pairs so the plan is
    hashable and identical on every rank; use ``table_of(feature)`` / ``features_of(table)``.
    """

    tables: tuple
    feature_tables: tuple
    world_size: int
    replicated: tuple = ()     # sorted names of the tables every rank holds whole

    @classmethod
    def build(cls, tables: Sequence[TableConfig], feature_tables: Mapping[str, str],
              world_size: int, replicated: Sequence[str] = ()) -> "ShardingPlan":
        tables = tuple(tables)
        if int(world_size) < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not tables:
            raise ValueError("a sharding plan needs at least one table")
        names = [t.name for t in tables]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate table names in the plan: {dup}")
        if max(int(t.num_rows) for t in tables) * len(tables) >= 2 ** 62:
            raise ValueError("num_rows x number of tables must stay below 2**62: the hybrid "
                             "lookup packs (row, table) into one int64 key")
        known = set(names)
        pairs = []
        for feature, table in dict(feature_tables).items():
            if table not in known:
                raise ValueError(f"feature {feature!r} maps to unknown table {table!r}; "
                                 f"tables are {sorted(known)}")
            pairs.append((str(feature), str(table)))
        unused = sorted(known - {t for _, t in pairs})
        if unused:
            raise ValueError(f"tables {unused} are used by no feature; drop them or map a feature")
        stray = sorted(set(replicated) - known)
        if stray:
            raise ValueError(f"replicated tables {stray} are not in the plan; tables are {sorted(known)}")
        return cls(tables=tables, feature_tables=tuple(sorted(pairs)), world_size=int(world_size),
                   replicated=tuple(sorted(set(replicated))))

    @classmethod
    def from_schema(cls, schema, features: Sequence[str], dim: int, world_size: int,
                    replicate_under: int = 0) -> "ShardingPlan":
        """The plan for the tables the given sparse ``features`` of ``schema`` look up, every
        table at embedding dimension ``dim``, those of at most ``replicate_under`` parameter
        bytes replicated (0: none): the one way a run builds its plan."""
        feature_tables = {f: schema.feature(f).table for f in features}
        tables = [TableConfig(name=spec.name, num_rows=spec.num_rows, dim=int(dim), hashed=spec.hashed)
                  for spec in (schema.table(n) for n in sorted(set(feature_tables.values())))]
        replicated = [t.name for t in tables if t.param_bytes <= int(replicate_under)]
        return cls.build(tables, feature_tables, world_size, replicated)

    # ---- lookups by name ----
    def table(self, name: str) -> TableConfig:
        return find_named(self.tables, name, "table")

    def table_index(self, name: str) -> int:
        """Position of table ``name`` in plan order (the order of every per-table list)."""
        return self.tables.index(self.table(name))

    def table_of(self, feature: str) -> TableConfig:
        for f, t in self.feature_tables:
            if f == feature:
                return self.table(t)
        raise KeyError(f"feature {feature!r} has no table in the plan; features are "
                       f"{[f for f, _ in self.feature_tables]}")

    def features_of(self, table: str) -> tuple:
        """Features sharing ``table``, in sorted order (the order lookup concatenates them)."""
        return tuple(f for f, t in self.feature_tables if t == table)

    @property
    def features(self) -> tuple:
        return tuple(f for f, _ in self.feature_tables)

    # ---- placement: the one rule (ints, numpy arrays and TF int64 tensors alike) ----
    def owner(self, rows, table: str | None = None):
        """Rank holding global ``rows`` of ``table`` (today the same rule for every table)."""
        return rows % self.world_size

    def local_row(self, rows, table: str | None = None):
        """Index of global ``rows`` inside their owner's shard (a replicated table's whole copy)."""
        return rows if table in self.replicated else rows // self.world_size

    def is_replicated(self, table: str) -> bool:
        return self.table(table).name in self.replicated

    def rows_on_rank(self, table: str, rank: int) -> int:
        """Number of rows of ``table`` held by ``rank`` (0 when the table has fewer rows than ranks)."""
        self._check_rank(rank)
        n = self.table(table).num_rows
        if self.is_replicated(table):
            return n
        return max(0, (n - rank + self.world_size - 1) // self.world_size)

    def global_rows(self, table: str, rank: int) -> np.ndarray:
        """Global row ids held by ``rank``, in local-row order (int64)."""
        self._check_rank(rank)
        step = 1 if self.is_replicated(table) else self.world_size
        return np.arange(0 if step == 1 else rank, self.table(table).num_rows, step, dtype=np.int64)

    # ---- memory ----
    def bytes_on_rank(self, rank: int, slots_per_row: int = 0) -> int:
        """Parameter plus optimizer-slot bytes held by ``rank`` when sharded.

        ``slots_per_row``: float vectors of size ``dim`` the optimizer keeps per row
        (sgd 0, adagrad 1, adam 2; see ``gmeta.trainer.embedding.row_optim.slots_per_row``).
        """
        return sum(self.rows_on_rank(t.name, rank) * t.dim * BYTES_PER_FLOAT * (1 + slots_per_row)
                   for t in self.tables)

    def bytes_per_rank(self, slots_per_row: int = 0) -> list:
        return [self.bytes_on_rank(r, slots_per_row) for r in range(self.world_size)]

    def replicated_bytes(self, slots_per_row: int = 0) -> int:
        """Bytes every rank holds when tables are replicated (the naive baseline)."""
        return sum(t.param_bytes * (1 + slots_per_row) for t in self.tables)

    def with_world_size(self, world_size: int) -> "ShardingPlan":
        return ShardingPlan.build(self.tables, dict(self.feature_tables), world_size, self.replicated)

    def with_num_rows(self, num_rows: Mapping[str, int]) -> "ShardingPlan":
        """The same plan with other sizes for the named tables: where a run whose vocabularies
        were smaller (the source of a warm start) placed its rows."""
        tables = [replace(t, num_rows=int(num_rows[t.name])) if t.name in num_rows else t for t in self.tables]
        return ShardingPlan.build(tables, dict(self.feature_tables), self.world_size, self.replicated)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= int(rank) < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
