"""Implicit feedback: a table of events holds only what happened, so each task also gets sampled
label-0 rows of items (the other side) it never had an event with, drawn from the items of its
temperature (warm items for train, val and cold-user tasks; cold items for the cold-item splits).

The draws are a hash of (seed, task, split, attempt), not a stream of a shared generator, so a
task gets the same negatives however the events were partitioned. A support negative follows a
support event (spread evenly over them), so any prefix of a support set has both labels; the
query negatives come after the task's query events. Item-side features of a sampled item come
from the item id column or a side table joined on it; the task's other features are those of
the event the negative follows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gmeta.tools.common import group_arange
from gmeta.tools.table.extract import OTHER, TASK, label_col
from gmeta.tools.table.protocol import Arranged, Decisions
from gmeta.tools.table.spec import SPLITS, TableConfig
from gmeta.tools.table.stats import KeyTable

MAX_ROUNDS = 64          # rejection rounds; a task still short after them keeps what it has (counted)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Pool:
    """The items negatives are drawn from: warm ones (sorted) at ``[0, n_warm)``, cold ones
    (sorted) after, with the partition columns of their item-side features."""

    keys: pa.Array
    n_warm: int
    columns: dict

    def __len__(self) -> int:
        return len(self.keys)


def build_pool(decisions: Decisions, others: KeyTable, item_columns) -> Pool:
    """``item_columns(keys)``: the item-side partition columns of each key (the extractor's)."""
    cold = np.zeros(len(others), bool)
    if decisions.cold_others is not None and len(decisions.cold_others):
        cold = pc.is_in(others.keys, value_set=decisions.cold_others).to_numpy(zero_copy_only=False)
    keys = pa.concat_arrays([others.keys.filter(pa.array(~cold)), others.keys.filter(pa.array(cold))])
    return Pool(keys, int((~cold).sum()), item_columns(keys))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each value (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _count_in_ranges(sorted_keys: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_keys, hi) - np.searchsorted(sorted_keys, lo)


def sample(ident: np.ndarray, user: np.ndarray, lo: np.ndarray, hi: np.ndarray, need: np.ndarray,
           rated: np.ndarray, n_pool: int, seed: int) -> tuple:
    """Per task t, up to ``need[t]`` distinct items of ``[lo[t], hi[t])`` that ``user[t]`` never
    had an event with (``rated``: sorted ``user * n_pool + item``), by rounds of vectorised
    rejection sampling; ``ident[t]`` names the task in the hash. Returns ``(task, item, short)``
    grouped by task in draw order; ``short`` counts tasks that got fewer than they needed."""
    span = hi - lo
    free = span - _count_in_ranges(rated, user * n_pool + lo, user * n_pool + hi)
    wanted, need = need, np.minimum(need, np.maximum(free, 0))
    with np.errstate(over="ignore"):
        base = _mix(_mix(np.asarray([seed], np.uint64) + _GOLDEN) ^ ident.astype(np.uint64))
    attempts = np.zeros(len(need), np.int64)
    task, item, seq = (np.zeros(0, np.int64),) * 3
    short = np.flatnonzero(need > 0)
    for _ in range(MAX_ROUNDS):
        if not short.size:
            break
        have = np.bincount(task, minlength=len(need))
        want = need[short] - have[short]
        draws = np.ceil(want * span[short] / np.maximum(free[short], 1) * 1.25).astype(np.int64) + 2
        draws = np.minimum(draws, 4 * span[short] + 8)
        t = np.repeat(short, draws)
        a = attempts[t] + group_arange(draws)
        attempts[short] += draws
        with np.errstate(over="ignore"):
            h = _mix(base[t] + a.astype(np.uint64) * _GOLDEN)
        i = lo[t] + (h % span[t].astype(np.uint64)).astype(np.int64)
        key = user[t] * n_pool + i
        pos = np.minimum(np.searchsorted(rated, key), max(len(rated) - 1, 0))
        fresh = rated[pos] != key if len(rated) else np.ones(len(key), bool)
        task, item, seq = np.r_[task, t[fresh]], np.r_[item, i[fresh]], np.r_[seq, a[fresh]]
        order = np.lexsort((seq, task))
        task, item, seq = task[order], item[order], seq[order]
        _, first = np.unique(task * n_pool + item, return_index=True)     # a repeated draw counts once
        first.sort()
        task, item, seq = task[first], item[first], seq[first]
        keep = group_arange(np.bincount(task, minlength=len(need))) < need[task]    # task is sorted
        task, item, seq = task[keep], item[keep], seq[keep]
        short = np.flatnonzero(np.bincount(task, minlength=len(need)) < need)
    return task, item, int((np.bincount(task, minlength=len(need)) < wanted).sum())


def rated_keys(part: pa.Table, decisions: Decisions, pool: Pool) -> np.ndarray:
    """Sorted ``task position * len(pool) + item`` of every event in a partition (all splits)."""
    user = decisions.tasks.positions(part.column(TASK))
    item = pc.fill_null(pc.index_in(part.column(OTHER), value_set=pool.keys), -1).to_numpy(zero_copy_only=False)
    ok = item >= 0
    return np.unique(user[ok] * len(pool) + item[ok])


def add_negatives(a: Arranged, rated: np.ndarray, pool: Pool, cfg: TableConfig) -> Arranged:
    """The arranged partition with each task's sampled label-0 rows in place (see the module)."""
    n = len(a.split)
    if n == 0 or len(pool) == 0:
        return a
    starts = np.flatnonzero(np.r_[True, (a.split[1:] != a.split[:-1]) | (a.task_id[1:] != a.task_id[:-1])])
    sizes = np.diff(np.r_[starts, n])
    task_of_row = np.repeat(np.arange(len(starts)), sizes)
    n_query = np.bincount(task_of_row, weights=a.is_query, minlength=len(starts)).astype(np.int64)
    n_support = sizes - n_query
    need_support = np.round(cfg.support_negatives * n_support).astype(np.int64)
    split, user = a.split[starts].astype(np.int64), a.task_id[starts].astype(np.int64)
    cold_items = np.isin(split, [SPLITS.index(f"{cfg.other_kind}_cold"), SPLITS.index("user_item_cold")])
    lo = np.where(cold_items, pool.n_warm, 0).astype(np.int64)
    hi = np.where(cold_items, len(pool), pool.n_warm).astype(np.int64)
    need = need_support + np.where(n_query > 0, cfg.negatives, 0)
    task, item, short = sample(user * len(SPLITS) + split, user, lo, hi, need, rated, len(pool), cfg.seed)
    rank = group_arange(np.bincount(task, minlength=len(starts)))
    support = rank < need_support[task]
    # support negative j of a task follows its support event floor(j * S / k); queries go last
    sup_rows = np.flatnonzero(a.is_query == 0)
    sup_start = np.cumsum(n_support) - n_support
    k = np.maximum(need_support[task], 1)
    follow = np.floor(rank * n_support[task] / k).astype(np.int64)
    q_rows = np.flatnonzero(a.is_query != 0)
    q_last = np.cumsum(n_query) - 1
    after = np.where(support, sup_rows[np.minimum(sup_start[task] + follow, max(len(sup_rows) - 1, 0))]
                     if len(sup_rows) else 0,
                     q_rows[np.maximum(q_last[task], 0)] if len(q_rows) else 0)
    position = group_arange(sizes)
    slot = np.r_[position.astype(np.float64),
                 np.where(support, position[after] + 0.5, sizes[task] + rank - need_support[task])]
    negative = a.table.take(pa.array(after))
    replaced = {label_col(lab.name): pa.array(np.zeros(len(task), np.float32)) for lab in cfg.labels}
    replaced[OTHER] = pool.keys.take(pa.array(item))
    replaced.update({name: col.take(pa.array(item)) for name, col in pool.columns.items()})
    for name, col in replaced.items():
        i = negative.schema.get_field_index(name)
        negative = negative.set_column(i, negative.schema.field(i), col.cast(negative.schema.field(i).type))
    split_all = np.r_[a.split, a.split[after]]
    task_all = np.r_[a.task_id, a.task_id[after]]
    query_all = np.r_[a.is_query, (~support).astype(a.is_query.dtype)]
    order = np.lexsort((slot, task_all, split_all))
    table = pa.concat_tables([a.table, negative]).take(pa.array(order))
    counts = dict(a.counts, negative_rows=int(len(task)), tasks_short_of_negatives=short)
    return replace(a, table=table, split=split_all[order], task_id=task_all[order], is_query=query_all[order],
                   counts=counts)
