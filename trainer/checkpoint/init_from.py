"""``--init-from``: start a new run from trained weights, an export's or a checkpoint's.

Every model variable whose name and shape exist in both the source and the learner is copied;
the rest keep their initial values and the optimizers' state stays fresh, so a changed model or
config still starts from whatever fits.

Tables follow the vocabulary rule of a daily retrain (``--vocab-from``): a known id keeps its
row and new ids get new rows at the end, so a table may grow. Its rows ``[0, old_rows)`` come
from the source, re-sharded for this run's workers by the plan's placement rule; the new rows
keep what the embedding gave them, the initial rows of their global ids
(``gmeta.trainer.embedding.initial``), the same for any worker count, unless the model
generates them (MetaEmb: an item's embedding from its side features, read from the first row of
that item in today's dataset, with the source's generator; every rank computes the same rows,
so the lookups it makes are the same collectives on every rank). A table that shrank,
changed its dimension, is hashed with another bucket count, or whose vocabulary (where the source
and today's dataset both keep one) does not keep the source's ids on their rows cannot be mapped
row for row: the error names it before anything is copied.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gmeta.io import fs
from gmeta.io.errors import DataError
from gmeta.io.plan import first_values_by_key
from gmeta.io.vocab import keeps_rows, load_vocabularies
from gmeta.trainer.checkpoint.assemble import assemble_rows
from gmeta.trainer.checkpoint.files import (
    DENSE,
    CheckpointError,
    is_checkpoint,
    is_dir,
    latest_checkpoint,
    load_npz,
    read_checkpoint_meta,
)
from gmeta.trainer.meta.state import OPTIMIZER_PREFIXES, run_state
from gmeta.trainer.serving.export import EXPORT_FILE, load_export_vocabularies
from gmeta.trainer.tracking.mlflow_run import resolve_export_dir


def _hashed_tables(schema) -> dict:
    """{table: hashed?} of a source's schema JSON (a source without one: none hashed)."""
    return {t["name"]: bool(t.get("hashed", False)) for t in (schema or {}).get("tables", [])}


class _WeightSource:
    """Trained weights by name: an export directory or a checkpoint."""

    def __init__(self, source: str, tracking_uri):
        self.source = source
        self.checkpoint = None
        if is_checkpoint(source):
            self.checkpoint = source
        elif is_dir(source) and latest_checkpoint(source):
            self.checkpoint = latest_checkpoint(source)
        elif is_dir(source) and latest_checkpoint(fs.join(source, "checkpoints")):
            self.checkpoint = latest_checkpoint(fs.join(source, "checkpoints"))
        if self.checkpoint is not None:
            self.kind, self.where = "checkpoint", self.checkpoint
            self.manifest, self.meta = read_checkpoint_meta(self.checkpoint)
            dense = load_npz(fs.join(self.checkpoint, DENSE), self.manifest)
            self.values = {k[len("model/"):]: v for k, v in dense.items() if k.startswith("model/")}
            self.tables = {name: tuple(shape) for name, shape in self.meta.get("tables", {}).items()}
            self.hashed = _hashed_tables(self.meta.get("schema"))
            self.vocabularies = _dataset_vocabularies(self.meta.get("config", {}).get("data", ""))
            return

        self.kind, self.where = "export", resolve_export_dir(source, tracking_uri)
        with np.load(os.path.join(self.where, "dense.npz"), allow_pickle=False) as z:
            self.values = {k: z[k] for k in z.files}
        with open(os.path.join(self.where, EXPORT_FILE)) as f:
            meta = json.load(f)
        self.tables = {n: tuple(s) for n, s in meta.get("tables", {}).items()}
        self.hashed = _hashed_tables(meta.get("schema"))
        self.vocabularies = {v.table: v for v in load_export_vocabularies(self.where, meta).values()}
        self._embeddings = None

    def table_rows(self, wanted: dict, plan) -> dict:
        """``{table: sorted global rows}`` -> ``{table: their values}``; ``plan``: the source's
        (its table sizes, this run's worker count), one read of the shard files for every table."""
        if self.kind == "export":
            if self._embeddings is None:
                with np.load(os.path.join(self.where, "embeddings.npz"), allow_pickle=False) as z:
                    self._embeddings = {k: z[k] for k in z.files}
            return {t: self._embeddings[t][rows] for t, rows in wanted.items()}
        request = {("model", t): (rows, {f"table/{t}": ((rows.size, plan.table(t).dim), np.float32)}, plan)
                   for t, rows in wanted.items()}
        got = assemble_rows(self.checkpoint, self.manifest, self.meta, request)
        return {t: got[("model", f"table/{t}")] for t in wanted}


def table_problem(table, shape, hashed_there: bool) -> str | None:
    """Why a source table of ``shape`` cannot fill rows ``[0, shape[0])`` of ``table`` (a
    TableConfig) one to one, naming it, both shapes and what to do; None when it can (the
    vocabulary grew or stayed)."""
    old_rows, old_dim = int(shape[0]), int(shape[1])
    shapes = f"[{old_rows:,}, {old_dim}] there, [{table.num_rows:,}, {table.dim}] here"
    if old_dim != table.dim:
        return f"table {table.name} has another dimension ({shapes}): train with --emb-dim {old_dim}"
    if old_rows != table.num_rows and (table.hashed or hashed_there):
        return (f"table {table.name} is hashed and its bucket count changed ({shapes}): an id's bucket depends "
                f"on the count, so the trained rows cannot be mapped; keep {old_rows:,} buckets")
    if table.num_rows < old_rows:
        return (f"table {table.name} shrank ({shapes}): a vocabulary that keeps every known id on its row only "
                f"grows, so this dataset was not converted with --vocab-from the previous one; convert it "
                f"again with --vocab-from the dataset the source was trained on")
    return None


def _copy_dense(src: _WeightSource, state) -> tuple:
    """(loaded, left): model variables of the same name and shape are copied; the others keep
    their initial values (a changed layer, or a per-item-row variable that the new run fits from
    its own training split, such as ``--item-prior`` or MetaEmb's ``seen``)."""
    loaded, left = [], []
    for name, var in sorted(state.model_variables().items()):
        value = src.values.get(name)
        if value is not None and tuple(value.shape) == tuple(var.shape):
            var.assign(value)
            loaded.append(name)
        else:
            left.append(name if value is None else f"{name} (shape {list(value.shape)} there, "
                                                     f"{var.shape.as_list()} here)")
    return loaded, left


def _place(var, old: np.ndarray, values: np.ndarray) -> None:
    """The rows of ``var`` marked ``old`` get ``values``; the others keep theirs."""
    if old.all():
        var.assign(values)
        return
    full = var.numpy()
    full[old] = values
    var.assign(full)


def _rows_to_load(src: _WeightSource, plan, vocabularies: dict) -> tuple:
    """({table: its rows in the source}, tables the source lacks); raises, naming every table
    whose rows cannot be mapped one to one, before anything is copied. ``vocabularies``: this
    run's dataset's; where both sides keep one, today's must keep the source's values on their rows."""
    counts, left, problems = {}, [], []
    for t in plan.tables:
        shape = src.tables.get(t.name)
        problem = None if shape is None else (table_problem(t, shape, src.hashed.get(t.name, False))
                                              or vocabulary_problem(t.name, src.vocabularies, vocabularies))
        if shape is None:
            left.append(f"table/{t.name}")
        elif problem:
            problems.append(problem)
        else:
            counts[t.name] = int(shape[0])
    if problems:
        raise CheckpointError(f"--init-from {src.source}: {'; '.join(problems)} (or start without --init-from)")
    return counts, left


def vocabulary_problem(table: str, before: dict, now: dict) -> str | None:
    """Why the source's rows of ``table`` would land on other ids today (None: they would not, or
    one side keeps no vocabulary to tell): a dataset converted without ``--vocab-from`` numbers
    its ids afresh, and copying rows by position would give every id another id's vector."""
    old, new = before.get(table), now.get(table)
    if old is None or new is None or keeps_rows(old, new):
        return None
    return (f"table {table}: today's vocabulary (version {new.version}, {new.size:,} rows) does not keep the "
            f"source's values on their rows (version {old.version}, {old.size:,} rows): convert today's data "
            f"with --vocab-from the dataset the source was trained on")


def _dataset_vocabularies(data: str) -> dict:
    """A checkpoint's training dataset's vocabularies, where that dataset can still be read."""
    try:
        return load_vocabularies(data) if data else {}
    except (OSError, DataError):
        return {}


def _copy_tables(src: _WeightSource, emb, counts: dict) -> None:
    """Each rank copies the source rows ``[0, counts[table])`` it holds under this run's plan
    (from the shard files the source's placement put them in); new rows keep their initial values."""
    held = {t: np.asarray(emb.state_rows(t), dtype=np.int64) for t in counts}
    values = src.table_rows({t: rows[rows < counts[t]] for t, rows in held.items()},
                            emb.plan.with_num_rows(counts))
    variables = emb.state_variables()
    for t, rows in held.items():
        _place(variables[f"table/{t}"], rows < counts[t], values[t])
    emb.after_load()


def _generate_rows(learner, grown: dict, data: str) -> dict:
    """{table: rows generated}: the new rows of the table the model generates (``RowGenerator``),
    from each new id's first row in ``data``; the others keep their initial values."""
    gen = learner.model.row_generator()
    if gen is None or gen.table not in grown or not data:
        return {}
    old = grown[gen.table][0]
    schema = learner.model.schema
    max_lens = {f: schema.feature(f).max_len for f in gen.sparse if schema.feature(f).is_list}
    keys, values = first_values_by_key(data, schema.splits, gen.key, (*gen.sparse, *gen.dense), max_lens)
    table = schema.table(schema.feature(gen.key).table)
    rows = np.asarray(table.rows_of(keys), np.int64)
    new = rows >= old
    rows = rows[new]
    # every rank runs the same lookup (a collective under the hybrid embedding), even with no new rows
    part = {c: v[new][None] for c, v in values.items()}
    part.update({d: part[d].astype(np.float32) for d in gen.dense})
    vectors = learner.embedding.lookup({f: part[f] for f in gen.sparse})
    made = gen.generate(vectors, part)[0].numpy()
    emb = learner.embedding
    held = np.asarray(emb.state_rows(gen.table), np.int64)
    mine = np.isin(held, rows)
    if mine.any():
        var = emb.state_variables()[f"table/{gen.table}"]
        full = var.numpy()
        full[mine] = made[_positions(rows, held[mine])]
        var.assign(full)
        emb.after_load()
    return {gen.table: int(rows.size)}


def _positions(rows: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Index in ``rows`` (distinct) of each of ``wanted`` (all present)."""
    order = np.argsort(rows)
    return order[np.searchsorted(rows[order], wanted)]


def _grown(plan, counts: dict) -> dict:
    """{table: [rows loaded, rows now]} of the tables whose vocabulary grew."""
    return {t.name: [counts[t.name], t.num_rows] for t in plan.tables
            if t.name in counts and counts[t.name] < t.num_rows}


def init_from(source: str, learners: dict, tracking_uri, log, data: str = "") -> dict:
    """Copy the model variables and tables of ``source`` into each learner (module docstring);
    ``data``: this run's dataset, whose vocabularies must keep the source's rows; optimizer state
    stays fresh. Returns ``{learner: {"loaded": [...], "left": [...], "grown":
    {table: [rows loaded, rows now]}}}`` and logs what was loaded, grown and left at initial values."""
    src = _WeightSource(source, tracking_uri)
    today = _dataset_vocabularies(data)
    report = {}
    for prefix, learner in learners.items():
        state = run_state(learner)
        counts, missing = _rows_to_load(src, learner.embedding.plan, today)
        loaded, left = _copy_dense(src, state)
        _copy_tables(src, learner.embedding, counts)
        loaded += [f"table/{t}" for t in counts]
        left += missing
        who = "model" if prefix == "model" else "plain baseline (trained alongside)"
        grown = _grown(learner.embedding.plan, counts)
        generated = _generate_rows(learner, grown, data)
        for t, (old, new) in grown.items():
            how = f" ({generated[t]:,} generated from side features)" if t in generated else ""
            log(f"--init-from into the {who}: table {t}: {old:,} rows loaded, {new - old:,} new rows initialised{how}")
        unused = sorted(n for n in set(src.values) - set(state.model_variables())
                        if not n.startswith(OPTIMIZER_PREFIXES))
        report[prefix] = {"loaded": loaded, "left": left, "grown": grown, "generated": generated}
        log(f"--init-from {source} ({src.kind} {src.where}) into the {who}: loaded {len(loaded)} "
            f"[{', '.join(loaded)}]; left at initial values: {', '.join(left) or 'none'}"
            + (f"; not in this model: {', '.join(unused)}" if unused else ""))
    return report
