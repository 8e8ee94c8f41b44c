"""A learner's state as checkpoint arrays, and back onto any worker count.

Writing, each rank's shard file holds the rows it owns under the current plan, keyed by their
GLOBAL row ids (``shard_arrays``); rank 0's ``dense.npz`` holds every replicated variable
(``dense_arrays``).

Loading re-shards: rank ``j`` of ``M`` needs the rows ``embedding.state_rows(table)`` (its rows
under the NEW plan); it reads only the shard files of the old ranks that own any of them under
the OLD plan (the plan's one placement rule, ``plan.with_world_size(N).owner``), and places each
row by its global id. With the same worker count a rank reads its own file only; with another
it reads every file once (the placement interleaves rows).
"""

from __future__ import annotations

import numpy as np

from gmeta.io import fs
from gmeta.trainer.checkpoint.files import DENSE, ROWS, CheckpointError, load_npz, read_checkpoint_meta, shard_name
from gmeta.trainer.meta.state import assign_by_name, run_state


# ----------------------------------------------------------------------------- state by name
def _row_entries(embedding, state: dict) -> dict:
    """{table: [state names stored per row]}: ``table/<t>`` and its slots ``table/<t>/<slot>``."""
    out = {}
    for t in embedding.plan.tables:
        base = f"table/{t.name}"
        out[t.name] = [n for n in state
                       if n == base or (n.startswith(base + "/") and "/" not in n[len(base) + 1:])]
    return out


def split_state(learner):
    """(all state variables by name, {table: row-wise names}, the other names)."""
    state = run_state(learner)
    variables = {**state.replicated, **state.sharded}
    rows = _row_entries(learner.embedding, state.sharded)
    row_names = {n for names in rows.values() for n in names}
    return variables, rows, [n for n in variables if n not in row_names], state.plain


def shard_arrays(learners: dict, comm) -> dict:
    """This rank's rows of every table (global ids + values + slots) of every learner: rows are
    written by their owner under the current plan, so replicated tables are written once."""
    arrays = {}
    for prefix, learner in learners.items():
        emb = learner.embedding
        variables, rows, _, _ = split_state(learner)
        for table, names in rows.items():
            global_rows = np.asarray(emb.state_rows(table), dtype=np.int64)
            own = np.asarray(emb.plan.owner(global_rows, table)) == comm.rank
            arrays[f"{prefix}/{ROWS}{table}"] = global_rows[own]
            for n in names:
                arrays[f"{prefix}/{n}"] = variables[n].numpy()[own]
    return arrays


def dense_arrays(learners: dict) -> dict:
    """Every replicated variable (and the row optimizer's iteration counter) of every learner."""
    arrays = {}
    for prefix, learner in learners.items():
        variables, _, others, _ = split_state(learner)
        for n in others:
            arrays[f"{prefix}/{n}"] = variables[n].numpy()
    return arrays


def assemble_rows(path: str, manifest: dict, meta: dict, wanted: dict) -> dict:
    """Rows of several tables re-sharded for this rank.

    ``wanted``: ``{(prefix, table): (target global rows [K], {state name: (shape [K, ...],
    dtype)}, embedding plan)}``. Returns ``{(prefix, name): array}``, every target row filled
    from the shard file that holds it, or a CheckpointError naming what is missing.
    """
    old_size = int(meta["world_size"])
    needed = set()
    for (prefix, table), (target, _, plan) in wanted.items():
        old_plan = plan.with_world_size(old_size)
        needed.update(int(k) for k in np.unique(np.asarray(old_plan.owner(target, table))))
    out, filled = {}, {}
    for k in sorted(needed):
        file = fs.join(path, shard_name(k, old_size))
        data = load_npz(file, manifest)
        for (prefix, table), (target, names, _) in wanted.items():
            key = f"{prefix}/{ROWS}{table}"
            if key not in data:
                raise CheckpointError(f"checkpoint file {file} has no rows of table {table!r} "
                                      f"({prefix}); the checkpoint was written by another model")
            rows = data[key]
            pos = np.searchsorted(target, rows)
            hit = pos < target.size
            hit[hit] = target[pos[hit]] == rows[hit]
            if not hit.any():
                continue
            count = filled.setdefault((prefix, table), np.zeros(target.size, np.int64))
            np.add.at(count, pos[hit], 1)
            for n, (shape, dtype) in names.items():
                values = data.get(f"{prefix}/{n}")
                if values is None:
                    raise CheckpointError(f"checkpoint file {file} has no {prefix} state {n!r}; the "
                                          f"checkpoint was written by another model or optimizer")
                if tuple(values.shape[1:]) != tuple(shape[1:]):
                    raise CheckpointError(f"checkpoint file {file}: {prefix} {n} has rows of shape "
                                          f"{list(values.shape[1:])}, this run expects {list(shape[1:])}")
                if (prefix, n) not in out:
                    out[(prefix, n)] = np.zeros(shape, dtype)
                out[(prefix, n)][pos[hit]] = values[hit]
    for (prefix, table), (target, names, _) in wanted.items():
        count = filled.get((prefix, table), np.zeros(target.size, np.int64))
        if target.size and not (count == 1).all():
            bad = int(target[np.argmax(count != 1)])
            raise CheckpointError(f"checkpoint {path}: {int((count == 0).sum())} rows of table {table!r} "
                                  f"({prefix}) are in no shard file (e.g. row {bad}); the checkpoint is "
                                  f"incomplete or its tables have another size")
        for n, (shape, dtype) in names.items():
            if (prefix, n) not in out:  # nothing to fill (this rank holds no row of the table)
                out[(prefix, n)] = np.zeros(shape, dtype)
    return out


# ----------------------------------------------------------------------------- restore
def restore_checkpoint(path: str, learners: dict, comm=None) -> dict:
    """Load a committed checkpoint into ``learners`` (re-sharded for this world size) and return
    its meta. Every name must match both ways (``gmeta.trainer.meta.state.assign_by_name``)."""
    manifest, meta = read_checkpoint_meta(path)
    missing = sorted(set(learners) - set(meta.get("learners", [])))
    if missing:
        raise CheckpointError(f"checkpoint {path} holds no state for {missing} (it has "
                              f"{meta.get('learners')}); was the plain baseline trained alongside?")
    dense = load_npz(fs.join(path, DENSE), manifest)
    wanted, parts = {}, {}
    for prefix, learner in learners.items():
        variables, rows, others, _ = split_state(learner)
        parts[prefix] = (variables, others)
        for table, names in rows.items():
            target = np.asarray(learner.embedding.state_rows(table), dtype=np.int64)
            templates = {n: (tuple(variables[n].shape), variables[n].dtype.as_numpy_dtype) for n in names}
            wanted[(prefix, table)] = (target, templates, learner.embedding.plan)
    assembled = assemble_rows(path, manifest, meta, wanted)
    for prefix, learner in learners.items():
        variables, others = parts[prefix]
        values = {k[len(prefix) + 1:]: v for k, v in dense.items() if k.startswith(prefix + "/")}
        values.update({n: v for (p, n), v in assembled.items() if p == prefix})
        assign_by_name(variables, values, f"checkpoint {path} ({prefix})")
        learner.embedding.after_load()
        learner.model.load_plain_state(meta.get("plain_state", {}).get(prefix, {}))
    return meta
