"""Tiered embeddings, the plan side: how skewed id access is, and which rows to replicate.

FAE's observation: a few rows take most lookups. ``profile_split`` counts rows per table over a
sample of a split's stripes (evenly spaced over the split, so a file order by time or user does
not bias it); ``save_profile`` / ``load_profile`` keep it next to the data (``DIR/_profile``)
so that every rank reads the same counts, and ``choose_hot`` turns counts and a per-worker
memory budget into hot rows per table. All deterministic (ties by row id): every rank that
reads the same profile picks the same hot set without a collective. Pure numpy / pyarrow.

What replication buys, in wire bytes (``expected_bytes`` is this model, the bench measures it):
a row fetched through the AlltoAll costs ``8 + 8 dim`` bytes per remote (rank, step) pair (id,
vector, gradient back); a replicated row costs nothing to read, but its gradient must reach
every replica: ``4 (dim + 1) (N - 1)`` per touching rank with the sparse sync (an allgather), or
``8 (dim + 1) (N - 1)`` per row and step, touched or not, with the dense sync (a ring
allreduce). So for exact, synchronous training, replication never lowers total bytes for
N >= 2 (it ties at N = 2 with the sparse sync, and for rows every rank touches every step with
the dense sync); what it can change is step time: hot rows skip the AlltoAll round trip and the
dense sync rides the step's one fused allreduce.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gmeta.io import fs
from gmeta.io.errors import DataError
from gmeta.io.plan import load_schema, split_stripes
from gmeta.io.schema import id_rows
from gmeta.io.stripes import OrcFileCache, read_stripe
from gmeta.trainer.embedding.plan import parse_bytes

PROFILE_DIR = "_profile"
COVER_SHARES = (0.001, 0.01, 0.1)


@dataclass(frozen=True)
class TableProfile:
    """Lookup counts of one table: ``rows`` (int64, most looked up first, ties by row id) and
    their ``counts``; rows never seen in the sample are not listed."""

    name: str
    num_rows: int
    rows: np.ndarray
    counts: np.ndarray

    @property
    def lookups(self) -> int:
        return int(self.counts.sum())

    def coverage(self, share: float) -> float:
        """Share of lookups that the top ``share`` of the table's rows take."""
        k = int(np.ceil(share * self.num_rows))
        return float(self.counts[:k].sum() / max(self.lookups, 1))


def profile_split(dataset_dir: str, split: str = "train", sample_rows: int = 2_000_000,
                  progress=None) -> dict:
    """``{table: TableProfile}`` over every sparse feature of the schema, from evenly spaced
    stripes of ``split`` holding about ``sample_rows`` rows (all of them when 0 or fewer)."""
    schema = load_schema(dataset_dir)
    stripes = split_stripes(fs.join(dataset_dir, split), schema)
    if not stripes:
        raise DataError(f"split {split!r} has no stripes to profile", file=fs.join(dataset_dir, split))
    total = sum(int(e["rows"]) for _, _, e in stripes)
    take = len(stripes) if sample_rows <= 0 or total <= sample_rows else \
        max(1, int(np.ceil(len(stripes) * sample_rows / total)))
    chosen = [stripes[i] for i in np.unique(np.linspace(0, len(stripes) - 1, take).round().astype(int))]
    features = {}
    for f in schema.sparse:
        features.setdefault(f.table, []).append(f)
    columns = [f.name for feats in features.values() for f in feats]
    parts = {t: [] for t in features}
    cache = OrcFileCache()
    for done, (path, stripe, _) in enumerate(chosen, 1):
        try:
            reader = cache.get(path)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot open (truncated or corrupt?): {exc}", file=path) from None
        batch = read_stripe(reader, path, stripe, columns)
        for table, feats in features.items():
            spec = schema.table(table)
            for f in feats:
                name = f.name
                arr = batch.column(name)
                values = arr.flatten() if f.is_list else arr
                if values.null_count:
                    raise DataError("null ids", file=path, stripe=stripe, column=name)
                ids = np.asarray(values.to_numpy(zero_copy_only=False), np.int64)
                ids = ids[ids >= 0]
                bad = ids >= spec.num_rows
                if not spec.hashed and bad.any():
                    raise DataError(f"id {int(ids[bad][0])} is out of range for table {table} "
                                    f"({spec.num_rows} rows)", file=path, stripe=stripe, column=name)
                rows, counts = np.unique(id_rows(ids, spec.num_rows, spec.hashed), return_counts=True)
                parts[table].append((rows, counts))
        if progress is not None:
            progress(done, len(chosen))
    out = {}
    for table, got in parts.items():
        rows = np.concatenate([r for r, _ in got]) if got else np.zeros(0, np.int64)
        counts = np.concatenate([c for _, c in got]) if got else np.zeros(0, np.int64)
        rows, inv = np.unique(rows, return_inverse=True)
        counts = np.bincount(inv, weights=counts, minlength=rows.size).astype(np.int64)
        order = np.lexsort((rows, -counts))  # most looked up first, ties by row id
        out[table] = TableProfile(table, schema.table(table).num_rows, rows[order].astype(np.int64),
                                  counts[order])
    return out


def skew_report(profiles: dict) -> dict:
    """Per table: lookups, distinct rows seen, and the share of lookups the top 0.1%, 1% and 10%
    of its rows take."""
    return {t: {"num_rows": p.num_rows, "lookups": p.lookups, "distinct_rows": int(p.rows.size),
                "coverage": {f"{s:.1%}": round(p.coverage(s), 4) for s in COVER_SHARES}}
            for t, p in sorted(profiles.items())}


def save_profile(profiles: dict, out_dir: str, meta: dict, keep_rows: int = 1_000_000) -> str:
    """``out_dir/summary.json`` (skew report + ``meta``) and ``out_dir/<table>.npz`` (the
    ``keep_rows`` most looked-up rows and counts). Returns ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    for name, p in profiles.items():
        np.savez(os.path.join(out_dir, f"{name}.npz"), rows=p.rows[:keep_rows], counts=p.counts[:keep_rows],
                 num_rows=np.int64(p.num_rows), lookups=np.int64(p.lookups))
    summary = {**meta, "tables": skew_report(profiles)}
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return out_dir


def load_profile(out_dir: str, tables) -> dict:
    """The saved profile of ``tables`` (names); a missing or broken file is a DataError naming it."""
    out = {}
    for name in tables:
        path = os.path.join(out_dir, f"{name}.npz")
        try:
            with np.load(path, allow_pickle=False) as z:
                rows, counts = z["rows"].astype(np.int64), z["counts"].astype(np.int64)
                num_rows = int(z["num_rows"])
        except FileNotFoundError:
            raise DataError(f"no profile of table {name}; run `gmeta profile` on the dataset", file=path) from None
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"broken profile ({exc}); rerun `gmeta profile`", file=path) from None
        if rows.shape != counts.shape or (rows.size and (rows.min() < 0 or rows.max() >= num_rows)):
            raise DataError("profile rows and counts disagree or fall outside the table; rerun `gmeta profile`",
                            file=path)
        out[name] = TableProfile(name, num_rows, rows, counts)
    return out


def parse_budget(text: str) -> int | None:
    """``--tiering``: ``off`` -> None, ``auto`` -> -1, else bytes per worker (``64M``, ``1G``,
    ``500000``). Anything else is a ValueError naming the flag."""
    value = str(text).strip().lower()
    if value == "off":
        return None
    if value == "auto":
        return -1
    try:
        budget = parse_bytes(value, "--tiering")
    except ValueError:
        raise ValueError(f"--tiering must be off, auto or a byte budget per worker such as 64M, got {text!r}") from None
    if budget <= 0:
        raise ValueError(f"--tiering budget must be > 0 bytes, got {text!r}")
    return budget


def choose_hot(profiles: dict, dims: dict, budget_bytes: int, slots_per_row: int,
               max_share: float = 0.01) -> dict:
    """Hot rows per table (sorted int64): the most looked-up rows over all tables whose
    replicas (value + optimizer slots) fit ``budget_bytes`` per worker, at most ``max_share`` of
    each table's rows. ``budget_bytes = -1`` (auto) allows up to ``max_share`` of every table."""
    cands = []
    for name, p in sorted(profiles.items()):
        cap = int(np.floor(max_share * p.num_rows))
        k = min(cap, p.rows.size)
        cost = dims[name] * 4 * (1 + slots_per_row)
        cands.append((np.repeat(name, k), p.rows[:k], p.counts[:k], np.full(k, cost)))
    if not cands:
        return {}
    names = np.concatenate([c[0] for c in cands])
    rows = np.concatenate([c[1] for c in cands])
    counts = np.concatenate([c[2] for c in cands])
    costs = np.concatenate([c[3] for c in cands])
    order = np.lexsort((rows, names, -counts))
    if budget_bytes is not None and budget_bytes >= 0:
        fits = np.cumsum(costs[order]) <= budget_bytes
        order = order[fits]
    return {name: np.sort(rows[order][names[order] == name]).astype(np.int64) for name in profiles}


def expected_bytes(profile: TableProfile, hot_rows: np.ndarray, dim: int, lookups_per_rank: int,
                   world_size: int) -> dict:
    """The wire-byte model of the module docstring for one table and step: ``alltoall`` (the
    cold rows' round trip), ``sparse_sync`` and ``dense_sync`` (the hot rows' gradients), each
    summed over ranks. Rows are assumed looked up independently with their profiled frequency."""
    p = profile.counts / max(profile.lookups, 1)
    touched = 1.0 - np.power(1.0 - p, lookups_per_rank)  # per rank and step
    hot = np.isin(profile.rows, hot_rows)
    n = world_size
    return {"alltoall": float(touched[~hot].sum() * (n - 1) * 8 * (dim + 1)),
            "sparse_sync": float(touched[hot].sum() * n * (n - 1) * 4 * (dim + 1)),
            "dense_sync": float(hot_rows.size * 2 * (n - 1) * 4 * (dim + 1))}


def choose_sync(profiles: dict, hot: dict, dims: dict, lookups: dict, world_size: int) -> str:
    """``sparse`` or ``dense``: the hot sync the byte model (``expected_bytes``) says is cheaper
    for these hot rows at ``lookups`` per rank and step per table."""
    sparse = dense = 0.0
    for name, rows in hot.items():
        if rows.size:
            b = expected_bytes(profiles[name], rows, dims[name], lookups[name], world_size)
            sparse += b["sparse_sync"]
            dense += b["dense_sync"]
    return "sparse" if sparse <= dense else "dense"


def plan_tiering(model, data_dir: str, profile_dir: str, budget: int, slots_per_row: int,
                 rows_per_step: int, world_size: int, sync: str = "auto", log=print):
    """``(hot rows per table, sync)`` for a run: the saved profile (``profile_dir`` or
    ``data_dir/_profile``; profiled now, deterministically on every rank, when there is none),
    the hot rows under ``budget`` bytes per worker (-1: auto, up to 1% of each table), and the
    sync (``auto``: the byte model's choice). Logs what it chose and the expected traffic."""
    schema = model.schema
    tables = sorted({schema.feature(f).table for f in model.sparse_features})
    where = profile_dir or os.path.join(data_dir, PROFILE_DIR)
    if os.path.exists(os.path.join(where, "summary.json")):
        profiles = load_profile(where, tables)
        source = where
    else:
        if profile_dir:
            raise DataError("no profile here (summary.json missing); run `gmeta profile --out` to write one",
                            file=profile_dir)
        profiles = {t: p for t, p in profile_split(data_dir).items() if t in tables}
        source = "profiled now (no saved profile; `gmeta profile` saves one)"
    dims = {t: int(model.config.emb_dim) for t in tables}
    hot = choose_hot(profiles, dims, budget, slots_per_row)
    lookups = {t: 0 for t in tables}
    for f in model.sparse_features:
        feat = schema.feature(f)
        lookups[feat.table] += rows_per_step * (feat.max_len if feat.is_list else 1)
    if sync == "auto":
        sync = choose_sync(profiles, hot, dims, lookups, world_size)
    for t in tables:
        p = profiles[t]
        hits = float(p.counts[np.isin(p.rows, hot[t])].sum() / max(p.lookups, 1))
        b = expected_bytes(p, hot[t], dims[t], lookups[t], world_size)
        base = expected_bytes(p, np.zeros(0, np.int64), dims[t], lookups[t], world_size)["alltoall"]
        log(f"tiering {t}: {hot[t].size:,} hot rows of {p.num_rows:,} take {hits:.1%} of lookups ({source}); "
            f"expected wire bytes per step {(b['alltoall'] + b[sync + '_sync']) / 1e3:,.1f} KB with the "
            f"{sync} sync vs {base / 1e3:,.1f} KB untiered (a model; `gmeta bench hot` measures)")
    return hot, sync
