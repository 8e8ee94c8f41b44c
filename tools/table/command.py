"""Any event table (Parquet, ORC or CSV; local or hdfs://) -> Meta-IO cold-start tasks.

Two streamed passes, so the input may be larger than memory (``--memory-mb`` bounds the rows
held at once): pass 1 reads the events in record batches, checks and normalises them, counts
the vocabularies and each task's events and first time, and appends every row to one of P
temporary files by a hash of its task; pass 2 loads one file at a time, sorts it by task and
order, assigns splits and support/query roles, maps raw ids to rows and writes the tasks through
``TaskWriter``. The dataset keeps its vocabularies in ``DIR/_vocab`` and a summary in
``DIR/convert.json``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa

from gmeta.io.errors import DataError
from gmeta.io.fs import join, write_text
from gmeta.io.vocab import ValueCounter, load_vocabularies, save_vocabularies
from gmeta.io.writer import TaskWriter
from gmeta.tools.common import OutputConfig, Progress, add_output_arguments, prepare_out, run_command
from gmeta.tools.table.config import build_config, flag_fields, read_spec
from gmeta.tools.table.encode import Encoder, build_schema, build_vocabularies, kind_name, raw_values
from gmeta.tools.table.extract import BY_OTHER, BY_TASK, ORDER, OTHER, TASK, Extractor, feature_col, plan_columns
from gmeta.tools.table.partition import (MAX_PARTITIONS, MIB, MemoryPlan, Partitioner, choose_partitions,
                                         read_partition, return_freed_memory, split_again, trim)
from gmeta.tools.table.negatives import add_negatives, build_pool, rated_keys
from gmeta.tools.table.protocol import arrange, decide
from gmeta.tools.table.source import EventFiles, load_side
from gmeta.tools.table.spec import SPLITS, TASK_KINDS, SpecError, TableConfig
from gmeta.tools.table.stats import KeyStats

OUTPUTS = ("schema.json", "convert.json", "_vocab", *SPLITS)
MAX_DEPTH = 3
STATE_FACTOR = 3.0


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM where /proc has it (ru_maxrss also counts the image a
    forked parent had before exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def state_bytes(decisions, vocabs: dict) -> float:
    """What pass 2 keeps besides the partition: the vocabularies and the per-task decisions,
    times ``STATE_FACTOR`` for the hash tables a lookup builds over them."""
    tasks = decisions.tasks
    held = tasks.keys.nbytes + tasks.count.nbytes + tasks.first.nbytes + 3 * len(tasks)
    held += decisions.cold_others.nbytes if decisions.cold_others is not None else 0
    held += sum(v.values.nbytes for v in vocabs.values())
    return STATE_FACTOR * held


def pool_bytes(pool) -> float:
    return pool.keys.nbytes + sum(c.nbytes for c in pool.columns.values())


# ---------------------------------------------------------------------------------- pass 1
class PassOne:
    """Reads every event once: checks, counts, and partitions them by task."""

    def __init__(self, cfg: TableConfig, events: EventFiles, extractor: Extractor, memory: MemoryPlan, tmp: str):
        self.cfg, self.events, self.extractor, self.memory, self.tmp = cfg, events, extractor, memory, tmp
        self.tasks, self.others = KeyStats(), KeyStats()
        self.counters, self.max_lens = {}, {}
        self.rows, self.partitioner, self.estimated_bytes = 0, None, 0.0

    def run(self, read_columns, progress: Progress) -> list:
        for file, first_row, batch in self.events.batches(read_columns, self.memory.batch_rows):
            part = self.extractor(file, first_row, batch)
            if self.partitioner is None:
                self._open(part)
            self._count(part)
            self.partitioner.write(part)
            self.rows += part.num_rows
            progress.tick("pass 1 (read, partition)", part.num_rows)
        if self.partitioner is None:
            raise DataError("the input holds no rows", file=self.events.names[0])
        progress.tick("pass 1 (read, partition)", 0, force=True)
        return self.partitioner.close()

    def _open(self, part: pa.RecordBatch) -> None:
        """P from the first batch's bytes per row and the input's estimated rows."""
        self.estimated_bytes = self.events.estimate_rows() * part.nbytes / max(part.num_rows, 1)
        n = self.cfg.partitions or min(MAX_PARTITIONS, choose_partitions(self.estimated_bytes, self.memory.budget))
        self.partitioner = Partitioner(self.tmp, n, self.extractor.schema, TASK, buffer_bytes=self.memory.buffer_bytes)

    def _count(self, part: pa.RecordBatch) -> None:
        order = part.column(ORDER).to_numpy(zero_copy_only=False)
        names = part.schema.names
        ranked = {k: part.column(k).to_numpy(zero_copy_only=False) if k in names else None for k in (BY_TASK, BY_OTHER)}
        self.tasks.add(part.column(TASK), order, ranked[BY_TASK])
        if OTHER in names:
            valid = part.column(OTHER).is_valid()
            keep = valid.to_numpy(zero_copy_only=False)
            by = ranked[BY_OTHER]
            self.others.add(part.column(OTHER).filter(valid), order[keep], None if by is None else by[keep])
        for f in self.cfg.sparse:
            column = part.column(feature_col(f.name))
            if pa.types.is_list(column.type):
                longest = int(np.max(column.value_lengths().fill_null(0).to_numpy(), initial=0))
                self.max_lens[f.name] = max(self.max_lens.get(f.name, 0), longest)
            if not f.hashed:
                kind = kind_name(self.extractor.kinds[f.table_name])
                self.counters.setdefault(f.table_name, ValueCounter(kind)).add(raw_values(column))


# ---------------------------------------------------------------------------------- pass 2
class SplitStats:
    """Tasks, rows, query rows and label sums written per split."""

    def __init__(self, labels):
        self.labels = labels
        self.by_split = {}

    def add(self, split: str, table: pa.Table, tasks: int) -> None:
        s = self.by_split.setdefault(split, {"tasks": 0, "rows": 0, "query_rows": 0, **{f"sum_{k}": 0.0 for k in
                                                                                          self.labels}})
        s["tasks"] += tasks
        s["rows"] += table.num_rows
        s["query_rows"] += int(np.sum(table.column("is_query").to_numpy()))
        for k in self.labels:
            s[f"sum_{k}"] += float(np.sum(table.column(k).to_numpy(), dtype=np.float64))

    def summary(self) -> dict:
        out = {}
        for split in SPLITS:
            s = self.by_split.get(split, {"tasks": 0, "rows": 0, "query_rows": 0})
            out[split] = {"tasks": s["tasks"], "rows": s["rows"], "query_rows": s["query_rows"],
                          **{f"mean_{k}": (round(s[f"sum_{k}"] / s["rows"], 6) if s["rows"] else None)
                             for k in self.labels}}
        return out


class PassTwo:
    """One partition at a time: arrange, encode, write; a partition over the memory limit is
    split again with another hash first."""

    def __init__(self, cfg, decisions, encoder, schema, limit: float, buffer_bytes: int, tmp: str, pool=None):
        self.cfg, self.decisions, self.encoder, self.schema, self.pool = cfg, decisions, encoder, schema, pool
        self.limit, self.buffer_bytes, self.tmp = limit, buffer_bytes, tmp
        self.writers = {}
        self.stats = SplitStats([lab.name for lab in cfg.labels])
        self.counts = {}
        self.split_again = 0
        self.largest = 0

    def run(self, partitions: list, progress: Progress) -> None:
        queue = [(path, rows, size, 0) for path, rows, size in partitions]
        limit = self.limit
        try:
            while queue:
                path, rows, size, depth = queue.pop(0)
                if size > 1.25 * limit and depth < MAX_DEPTH and rows > 1:
                    n = min(MAX_PARTITIONS, math.ceil(size / limit) + 1)
                    subs = split_again(path, n, self.tmp, TASK, depth + 1, self.buffer_bytes)
                    self.split_again += 1
                    if max(r for _, r, _ in subs) < rows:
                        queue[0:0] = [(p, r, b, depth + 1) for p, r, b in subs]
                        continue
                    for p, r, _ in subs:      # one task holds every row: it cannot be split
                        if r == 0:
                            os.remove(p)
                    path, rows, size = max(subs, key=lambda s: s[1])
                self.largest = max(self.largest, size)
                self._one(path)
                progress.tick("pass 2 (sort, write)", rows)
        except BaseException:
            for w in self.writers.values():
                w.abort()
            raise
        for w in self.writers.values():
            w.close()
        progress.tick("pass 2 (sort, write)", 0, force=True)

    def _one(self, path: str) -> None:
        part = read_partition(path)
        os.remove(path)
        if part.num_rows == 0:        # no task hashed here
            return
        rated = rated_keys(part, self.decisions, self.pool) if self.pool is not None else None
        arranged = arrange(part, self.decisions, self.cfg)
        del part
        if self.pool is not None:
            arranged = add_negatives(arranged, rated, self.pool, self.cfg)
        for k, v in arranged.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        table = self.encoder.table(arranged)
        codes = arranged.split
        for code in np.unique(codes):
            lo, hi = (int(x) for x in np.searchsorted(codes, [code, code + 1]))
            name = SPLITS[int(code)]
            piece = table.slice(lo, hi - lo)
            if name not in self.writers:
                self.writers[name] = TaskWriter(self.cfg.out, self.schema, split=name,
                                                rows_per_stripe=self.cfg.rows_per_stripe,
                                                compression=self.cfg.compression)
            self.writers[name].write(piece)
            tasks = arranged.task_id[lo:hi]
            self.stats.add(name, piece, int(np.count_nonzero(np.diff(tasks)) + 1))
        trim()


# ---------------------------------------------------------------------------------- driver
def _previous(path: str) -> dict:
    if not path:
        return {}
    vocabs = load_vocabularies(path)
    if not vocabs:
        raise SpecError(f"--vocab-from {path!r} keeps no vocabularies (no {join(path, '_vocab')}); name a dataset "
                        f"written by gmeta convert table")
    return vocabs


def convert(cfg: TableConfig) -> dict:
    """Both passes; returns the summary also written to ``DIR/convert.json``."""
    t0 = time.perf_counter()
    progress = Progress("convert table", cfg.quiet, width=24, extra=lambda: f"  peak {peak_rss_mb():,.0f} MB")
    prepare_out(cfg.out, cfg.overwrite, OUTPUTS, error=SpecError)
    previous = _previous(cfg.vocab_from)
    sides = [load_side(j, cfg.src, cfg.csv_delimiter, cfg.derive) for j in cfg.joins]
    memory = MemoryPlan.of(cfg.memory_mb)
    text = (cfg.order[0], *(f.column for f in cfg.sparse if f.delimiter), *(d.column for d in cfg.derive))
    events = EventFiles(cfg.inputs, cfg.format, cfg.csv_delimiter, cfg.src, string_columns=text,
                        block_size=memory.batch_bytes)
    plan = plan_columns(cfg, events.fragments[0].schema, events.names[0], sides)
    events.check(plan.events)
    extractor = Extractor(cfg, plan, sides, events.format)
    tmp = tempfile.mkdtemp(prefix="gmeta-table-", dir=cfg.tmp_dir or None)
    try:
        one = PassOne(cfg, events, extractor, memory, tmp)
        partitions = one.run(plan.read, progress)
        t1 = time.perf_counter()
        tasks = one.tasks.finish()
        others = one.others.finish() if cfg.needs_other else None
        decisions = decide(cfg, tasks, others, extractor.order_kind)
        vocabs = build_vocabularies(cfg, one.counters, extractor.kinds, previous)
        one.counters, one.tasks, one.others = {}, None, None
        side_on = {c: sides[k].join.on for c, k in plan.side_of.items()}
        groups = {f.name: cfg.group_of(f, side_on) for f in cfg.sparse}
        pool = (build_pool(decisions, others, lambda keys: extractor.other_side(keys, groups))
                if cfg.negatives or cfg.support_negatives else None)
        schema = build_schema(cfg, vocabs, one.max_lens, groups)
        state = state_bytes(decisions, vocabs) + (STATE_FACTOR * pool_bytes(pool) if pool is not None else 0)
        trim()
        if state > 0.75 * cfg.memory_mb * MIB and not cfg.quiet:
            print(f"convert table: the vocabularies and per-task facts take {state / MIB:,.0f} MB of --memory-mb "
                  f"{cfg.memory_mb}; peak memory will exceed it (give more)", file=sys.stderr, flush=True)
        progress.begin()
        two = PassTwo(cfg, decisions, Encoder(cfg, vocabs, schema), schema, memory.partition_limit(state),
                      memory.buffer_bytes, tmp, pool)
        two.run(partitions, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    written = tuple(s for s in SPLITS if s in two.writers)
    if "train" not in written:
        raise SpecError(f"no train task has >= min_events ({cfg.min_task_events}) events of warm tasks; is the "
                        f"data too small for the spec (min_events, cold, val_fraction)?")
    schema = replace(schema, splits=written, meta={"source": "table", "spec": cfg.spec, "inputs": list(cfg.inputs),
                                                    "task_kind": cfg.task_kind, "vocab_from": cfg.vocab_from or None})
    if vocabs:
        save_vocabularies(cfg.out, vocabs)
    seconds = time.perf_counter() - t0
    summary = _summary(cfg, events, one, two, decisions, vocabs, sides, extractor, partitions, state, seconds,
                       t1 - t0)
    write_text(join(cfg.out, "convert.json"), json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    schema.save(cfg.out)      # last: an interrupted run leaves no schema.json
    return summary


def _summary(cfg, events, one, two, decisions, vocabs, sides, extractor, partitions, state, seconds, pass1) -> dict:
    d = decisions
    vocab = {}
    for table, members in cfg.features_by_table().items():
        if members[0].hashed:
            vocab[table] = {"size": members[0].hashed, "hashed": True}
        else:
            v = vocabs[table]
            vocab[table] = {"size": v.size, "hashed": False, "min_count": cfg.table_min_count(table),
                            "version": v.version, "previous": v.previous}
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "quiet")}
    return {
        "source": "table", "format": events.format, "files": events.names, "settings": settings,
        "rows": {"read": one.rows, "written": sum(s["rows"] for s in two.stats.by_split.values()), **two.counts},
        "tasks": {"seen": len(d.tasks), "kept": int(d.kept.sum()), "dropped": int((~d.kept).sum()),
                  "cold": int(d.cold.sum()), "val": int(d.val.sum()),
                  f"cold_{cfg.other_kind}s": None if d.cold_others is None else len(d.cold_others),
                  "cold_after": {k: v for k, v in d.thresholds.items() if v is not None}},
        "order_kind": extractor.order_kind,
        "splits": two.stats.summary(),
        "vocabularies": vocab,
        "side_tables": {s.name: {"rows": s.table.num_rows, "events_without_match": m}
                        for s, m in zip(sides, extractor.side_misses)},
        "memory": {"memory_mb": cfg.memory_mb, "partitions": len(partitions),
                   "estimated_partition_mb": round(one.estimated_bytes / MIB, 1),
                   "largest_partition_mb": round(two.largest / MIB, 1), "split_again": two.split_again,
                   "state_mb": round(state / MIB, 1), "partition_limit_mb": round(two.limit / MIB, 1),
                   "peak_rss_mb": round(peak_rss_mb(), 1)},
        "seconds": round(seconds, 3), "pass1_seconds": round(pass1, 3),
        "rows_per_s": round(one.rows / max(seconds, 1e-9), 1),
    }


def format_summary(s: dict) -> str:
    t, r, m = s["tasks"], s["rows"], s["memory"]
    labels = [k[len("mean_"):] for k in s["splits"]["train"] if k.startswith("mean_")]
    lines = [f"{r['read']:,} rows from {len(s['files'])} {s['format']} file(s) in {s['seconds']:.1f} s "
             f"({s['rows_per_s']:,.0f} rows/s), {r['written']:,} written; peak memory {m['peak_rss_mb']:,.0f} MB "
             f"(--memory-mb {m['memory_mb']}, {m['partitions']} partition(s), largest {m['largest_partition_mb']} MB)",
             f"tasks: {t['seen']:,} seen, {t['kept']:,} kept, {t['dropped']:,} dropped (too few/many events); "
             f"cold {t['cold']:,}, val {t['val']:,}",
             f"{'split':<15} {'tasks':>8} {'rows':>10} {'query':>9}" + "".join(f" {k:>10}" for k in labels)]
    for name, sp in s["splits"].items():
        means = "".join(f" {sp[f'mean_{k}']:>10.3f}" if sp[f"mean_{k}"] is not None else f" {'-':>10}"
                        for k in labels)
        lines.append(f"{name:<15} {sp['tasks']:>8,} {sp['rows']:>10,} {sp['query_rows']:>9,}{means}"
                     + ("" if sp["tasks"] else "  (empty: not written)"))
    lines.append("vocabularies: " + ", ".join(f"{k} {v['size']:,}" + (" (hashed)" if v["hashed"] else "")
                                              for k, v in s["vocabularies"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    d = TableConfig(out="")
    a = parser.add_argument
    a("--spec", help="the spec file (JSON, or YAML); flags below override its fields")
    a("--src", help="directory the spec's relative paths (input, join) are in (default: the current directory)")
    a("--input", action="append", help="events: a Parquet, ORC or CSV file or directory, local or hdfs:// "
                                       "(repeatable; spec: input)")
    a("--out", required=True, help="dataset directory to write")
    a("--format", help="csv, parquet or orc (default: from the file extension)")
    a("--csv-delimiter", help=f"CSV field separator (default: {d.csv_delimiter!r})")
    a("--task", help="the task column: a user id (or an item id with --task-kind item)")
    a("--task-kind", choices=TASK_KINDS, help=f"what a task is (default: {d.task_kind})")
    a("--order", help="the order column (numbers or timestamps), tie-breaking columns after it: COL[,COL...]")
    a("--timestamp-format", help="strptime format of string timestamps (default: numbers or ISO-8601)")
    a("--query-last", type=int, help="the query set is a task's last K events")
    a("--query-fraction", type=float, help="the query set is this fraction of a task's events (its last ones)")
    a("--query-column", help="the query set is the events whose column is 1 (0 = support)")
    a("--min-events", type=int, help="fewest events of a kept task and of a written task (default: query-last "
                                     "+ 1, else 2)")
    a("--max-events", type=int, help="most events of a kept task (default: no limit)")
    a("--label", action="append", metavar="NAME=EXPR",
      help="a label (click, conversion, rating): a column or 'COLUMN OP NUMBER', e.g. click='rating >= 4'")
    a("--sparse", action="append", metavar="COL", help="a sparse feature with a vocabulary (string or integer ids)")
    a("--list", action="append", metavar="COL=DELIM", help="a list feature from a delimited string column")
    a("--dense", action="append", metavar="COL", help="a float feature")
    a("--hashed", action="append", metavar="FEATURE=B", help="hash a feature's integer ids into B buckets")
    a("--min-count", type=int, help=f"fewest events of a value to get its own row (default: {d.min_count})")
    a("--item", metavar="COL", help="the item id column (the item_id_feature; the cold-items rule's column)")
    for side in ("users", "items"):
        a(f"--cold-{side}-after", help=f"cold {side}: first event after this (a number or an ISO date)")
        a(f"--cold-{side}-fraction", type=float, help=f"cold {side}: this fraction that arrived last")
        a(f"--cold-{side}-random", action="store_true", help=f"draw the cold {side} at random (seeded) instead")
    a("--split-column", help="each event's split is in this column (train, val, user_cold, item_cold, "
                             "user_item_cold); replaces the cold and val rules")
    a("--val-fraction", type=float, help="a seeded fraction of the warm tasks held out as split val")
    a("--negatives", type=int, help="implicit feedback: add this many sampled label-0 rows per query set, of items "
                                    "the task never had an event with (spec: negatives.query)")
    a("--support-negatives", type=float, help="with negatives: sampled label-0 rows per support event "
                                              "(spec: negatives.support)")
    a("--seed", type=int, help=f"seed of the val and random cold draws (default: {d.seed})")
    a("--vocab-from", help="a previous dataset: its values keep their rows, new ones are appended")
    a("--memory-mb", type=int, help=f"memory for rows held at once (default: {d.memory_mb}); chooses the number "
                                    f"of partitions")
    a("--partitions", type=int, help="number of partitions (default: from --memory-mb and the input's size)")
    a("--tmp-dir", help="where the partition files go (default: the system's temporary directory)")
    add_output_arguments(parser, OutputConfig(out=""), quiet_help="print nothing on success")


def config_from_args(args) -> TableConfig:
    """The one frozen config: defaults < spec file < flags."""
    spec = read_spec(args.spec) if args.spec else {}
    output = {"out": args.out, "rows_per_stripe": args.rows_per_stripe, "compression": args.compression,
              "overwrite": args.overwrite, "quiet": args.quiet, "spec": args.spec or ""}
    return build_config(spec, flag_fields(args), output)


def main(args) -> int:
    return_freed_memory()
    return run_command("convert table", config_from_args, args, convert, (SpecError, DataError), format_summary,
                       "convert.json (vocabularies in _vocab)")
