"""The protocol of ``gmeta convert table``, as ``gmeta convert movielens`` defines it: which tasks
are kept, cold or held out for validation (decided once from pass 1's per-key facts), and, per
partition, which split each event falls in, the order of a task's events and which are queries.

Splits by temperature (task side x the other side; names from the task kind's point of view,
so for user tasks): train = warm users x warm items, user_cold = cold users x warm items,
item_cold = train users x cold items, user_item_cold = cold x cold, val = val users x warm items
(their cold-item events are dropped, so item_cold keeps meaning "users the model trained on").
Support = a task's earlier events, query = its last ``k`` (or a fraction, or a column's flag).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gmeta.tools.common import group_arange
from gmeta.tools.table.extract import ORDER, OTHER, QUERY, SPLIT, TASK, threshold, tie
from gmeta.tools.table.spec import SPLITS, ColdRule, TableConfig
from gmeta.tools.table.stats import KeyTable

TRAIN, VAL = SPLITS.index("train"), SPLITS.index("val")


@dataclass(frozen=True)
class Decisions:
    """Per task (in ``tasks.keys`` order): kept, cold, val; the other side's cold keys."""

    tasks: KeyTable
    kept: np.ndarray
    cold: np.ndarray
    val: np.ndarray
    cold_others: Optional[pa.Array]
    thresholds: dict


def _cold(rule: ColdRule, keys: KeyTable, eligible: np.ndarray, seed: int, stream: int, order_kind: str) -> tuple:
    """(cold mask over ``keys``, the threshold used): first seen after ``after``, or the
    ``fraction`` of the eligible keys seen last (ties by key), or a seeded draw of them, or the
    fraction with the largest ``by`` value (ties by first seen, then key; threshold: that value)."""
    cold = np.zeros(len(keys), bool)
    if rule.after is not None:
        t = threshold(rule.after, order_kind)
        return eligible & (keys.first > t), t
    idx = np.flatnonzero(eligible)           # already in key order
    k = int(round(rule.fraction * idx.size))
    if k == 0:
        return cold, None
    if rule.random:
        cold[idx[np.random.default_rng([seed, 2, stream]).permutation(idx.size)[:k]]] = True
        return cold, None
    if rule.by:
        latest = idx[np.lexsort((keys.first[idx], keys.by[idx]))[idx.size - k:]]
        cold[latest] = True
        return cold, float(keys.by[latest].min())
    latest = idx[np.argsort(keys.first[idx], kind="stable")[idx.size - k:]]
    cold[latest] = True
    return cold, float(keys.first[latest].min())


def decide(cfg: TableConfig, tasks: KeyTable, others: Optional[KeyTable], order_kind: str) -> Decisions:
    """Kept tasks (``min_events``..``max_events`` events), cold tasks, val tasks (a seeded draw
    of the warm kept tasks in key order, as MovieLens' val users), cold other-side keys."""
    kept = tasks.count >= cfg.min_task_events
    if cfg.max_events:
        kept &= tasks.count <= cfg.max_events
    cold, t_task = _cold(cfg.task_rule, tasks, kept, cfg.seed, 0, order_kind)
    warm = np.flatnonzero(kept & ~cold)
    val = np.zeros(len(tasks), bool)
    n_val = int(round(cfg.val_fraction * warm.size))
    val[warm[np.random.default_rng([cfg.seed, 1]).permutation(warm.size)[:n_val]]] = True
    cold_others, t_other = None, None
    if others is not None:
        mask, t_other = _cold(cfg.other_rule, others, np.ones(len(others), bool), cfg.seed, 1, order_kind)
        cold_others = others.keys.filter(pa.array(mask))
    return Decisions(tasks, kept, cold, val, cold_others,
                     {f"{cfg.task_kind}s": t_task, f"{cfg.other_kind}s": t_other})


def split_codes(part: pa.Table, pos: np.ndarray, d: Decisions, cfg: TableConfig) -> np.ndarray:
    """Each event's split (index into SPLITS), -1 for a val task's event on a cold other-side key."""
    if cfg.split_column:
        return part.column(SPLIT).to_numpy().astype(np.int64)
    cold_task = d.cold[pos]
    cold_other = np.zeros(len(pos), bool)
    if d.cold_others is not None:
        cold_other = pc.fill_null(pc.is_in(part.column(OTHER), value_set=d.cold_others), False).to_numpy(
            zero_copy_only=False)
    code = np.full(len(pos), TRAIN, np.int64)
    code[cold_task] = SPLITS.index(f"{cfg.task_kind}_cold")
    code[cold_other] = SPLITS.index(f"{cfg.other_kind}_cold")
    code[cold_task & cold_other] = SPLITS.index("user_item_cold")
    val = d.val[pos]
    code[val] = VAL
    code[val & cold_other] = -1
    return code


@dataclass
class Arranged:
    """A partition's kept events, sorted by split, task and order, with their roles."""

    table: pa.Table
    split: np.ndarray
    task_id: np.ndarray
    is_query: np.ndarray
    counts: dict


def arrange(part: pa.Table, d: Decisions, cfg: TableConfig) -> Arranged:
    """Drop the events of dropped tasks (and of val tasks on cold keys), sort the rest by split,
    task, order and tie-breakers (a stable sort: input order last), drop tasks shorter than
    ``min_events`` and mark the queries. Intermediates are freed as it goes: this is the step
    the memory bound is sized for."""
    pos = d.tasks.positions(part.column(TASK))
    code = split_codes(part, pos, d, cfg).astype(np.int8)
    kept = d.kept[pos]
    counts = {"rows_of_dropped_tasks": int((~kept).sum()), "rows_of_val_tasks_on_cold": int((kept & (code < 0)).sum())}
    rows = pa.array(np.flatnonzero(kept & (code >= 0)).astype(np.int32))
    del kept
    keys = {"split": pa.array(code).take(rows), "task": pa.array(pos).take(rows), ORDER: part.column(ORDER).take(rows)}
    keys.update({tie(k): part.column(tie(k)).take(rows) for k in range(len(cfg.order) - 1)})
    del pos, code
    order = pc.sort_indices(pa.table(keys), sort_keys=[(k, "ascending") for k in keys])
    split = keys["split"].take(order).to_numpy()
    task = keys["task"].take(order).to_numpy()
    rows = rows.take(order)
    del keys, order
    group = np.flatnonzero(np.r_[True, (split[1:] != split[:-1]) | (task[1:] != task[:-1])])
    sizes = np.diff(np.r_[group, split.size]).astype(np.int32)
    size_of_row = np.repeat(sizes, sizes)
    long_enough = size_of_row >= cfg.min_task_events
    counts["rows_in_short_tasks"] = int((~long_enough).sum())
    counts["short_tasks"] = int((sizes < cfg.min_task_events).sum())
    position = group_arange(sizes).astype(np.int32)
    if not long_enough.all():
        rows, split, task = rows.filter(pa.array(long_enough)), split[long_enough], task[long_enough]
        position, size_of_row = position[long_enough], size_of_row[long_enough]
    table = part.take(rows)
    if cfg.query_column:
        is_query = table.column(QUERY).to_numpy().astype(np.int8)
    else:
        n_query = (cfg.query_last if cfg.query_last else
                   np.clip(np.round(cfg.query_fraction * size_of_row), 1, np.maximum(size_of_row - 1, 1)))
        is_query = (size_of_row - position <= n_query).astype(np.int8)
    return Arranged(table, split, task, is_query, counts)
