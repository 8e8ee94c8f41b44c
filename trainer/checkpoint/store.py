"""Checkpoints: the whole run's state on disk, written atomically, loadable on any worker count.

What a checkpoint holds comes from ONE place, ``gmeta.trainer.meta.state.run_state(learner)``, for the
model and (when it trains alongside) the plain baseline: every replicated variable by name
(model parameters, Meta-SGD rates, outer Adam slots and step), every rank's table shards with
their row-wise optimizer slots and the row optimizer's iteration counter, and the model's plain
switches; plus the reader position (epoch, step within the epoch, global step), the loss
history the divergence guard needs, the MLflow run id and the seeds. Nothing is pickled: arrays
are ``.npz`` (read with ``allow_pickle=False``), metadata JSON.

Layout, one directory per checkpoint named by the global step::

    <checkpoint-dir>/
      ckpt-000000035/               complete: renamed into place after COMMITTED was written
        COMMITTED                   JSON manifest, written last: size and sha256 of every file
        meta.json                   position, loss history, config, schema, tables, world size,
                                    MLflow run id, run directory, seeds
        dense.npz                   replicated state, ``<learner>/<state name>`` (rank 0 writes)
        shard-00000-of-00002.npz    rank 0's rows of every table: ``<learner>/@rows/<table>`` (the
        shard-00001-of-00002.npz    GLOBAL row ids) next to ``<learner>/table/<table>[/<slot>]``
      .ckpt-000000042.partial-<id>/ being written, or left by a kill: never read, pruned later
      FINISHED                      written when ``gmeta train`` completed

Writing (every rank, the same collectives in the same order): each rank writes its shard file
(fsync), rank 0 also ``dense.npz``; ONE ``allgather_object`` of the files' sizes and checksums
is the barrier that every part is on disk; rank 0 then writes ``meta.json`` and ``COMMITTED``,
fsyncs and renames the partial directory to ``ckpt-<step>`` (atomic on POSIX and HDFS), then
prunes to ``--keep-checkpoints``. A kill at any point leaves the previous checkpoint the newest
committed one (``latest_checkpoint``).

Loading re-shards: rank ``j`` of ``M`` needs the rows ``embedding.state_rows(table)`` (its rows
under the NEW plan); it reads only the shard files of the old ranks that own any of them under
the OLD plan (the plan's one placement rule, ``plan.with_world_size(N).owner``), and places each
row by its global id. With the same worker count a rank reads its own file only; with another
it reads every file once (the placement interleaves rows). Every file is checked against the
manifest's sha256 before use; a mismatch names the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import sys
import time
import uuid
from contextlib import contextmanager

import numpy as np
import pyarrow.fs as pafs

from gmeta.io import fs
from gmeta.trainer.config import TrainConfig, config_dict
from gmeta.trainer.meta.state import OPTIMIZER_PREFIXES, assign_by_name, run_state
from gmeta.trainer.serving.export import EXPORT_FILE
from gmeta.trainer.tracking.mlflow_run import resolve_export_dir

FORMAT = 1
CKPT_PREFIX = "ckpt-"
COMMITTED = "COMMITTED"
META = "meta.json"
DENSE = "dense.npz"
FINISHED = "FINISHED"
ROWS = "@rows/"
LEARNERS = ("model", "plain")
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
_PARTIAL_RE = re.compile(r"^\.ckpt-(\d+)\.partial-[0-9a-f]+$")

# TrainConfig fields that may change between a run and its resumption: where things go, how
# much is logged or evaluated, and how long to train. Every other field defines the run and must
# match the checkpoint (a field the checkpoint predates must equal its default).
OPERATIONAL_FIELDS = frozenset({
    "data", "epochs", "eval_inner_steps", "eval_splits", "validation_split", "tracking_uri",
    "experiment", "run_name", "output_dir", "log_every", "comm", "generator_epochs",
    "loss_rise_tolerance", "checkpoint_dir", "checkpoint_every_steps", "checkpoint_every_secs",
    "keep_checkpoints", "resume", "init_from", "plain_baseline", "register_as", "saved_model",
    "results_json", "support_curve", "stop_grace_secs",
})

# test hooks (never set in production): exit between the shard files and the commit of the
# checkpoint of this global step / stop (sleep) after this global step until killed
DIE_IN_CHECKPOINT_ENV = "GMETA_TEST_DIE_IN_CHECKPOINT"
PAUSE_AT_STEP_ENV = "GMETA_TEST_PAUSE_AT_STEP"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match this run; the message says which."""


# ----------------------------------------------------------------------------- names and listing
def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{int(step):09d}"


def shard_name(rank: int, size: int) -> str:
    return f"shard-{int(rank):05d}-of-{int(size):05d}.npz"


def _exists(path: str) -> bool:
    return fs.file_info(path).type != pafs.FileType.NotFound


def _is_dir(path: str) -> bool:
    return fs.file_info(path).type == pafs.FileType.Directory


def committed_checkpoints(directory: str) -> list:
    """``[(step, path)]`` of the committed checkpoints in ``directory``, oldest first."""
    try:
        entries = fs.list_dir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in entries:
        m = _CKPT_RE.match(e.base_name)
        if m and e.type == pafs.FileType.Directory:
            path = fs.join(directory, e.base_name)
            if _exists(fs.join(path, COMMITTED)):
                out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(directory: str):
    """The newest committed checkpoint in ``directory`` (a path), or None."""
    found = committed_checkpoints(directory)
    return found[-1][1] if found else None


def is_checkpoint(path: str) -> bool:
    """True for one committed checkpoint directory (``ckpt-<step>`` with its COMMITTED)."""
    return _exists(fs.join(path, COMMITTED))


# ----------------------------------------------------------------------------- files
class _HashingWriter:
    """Write-only stream that counts and hashes what passes (np.savez writes zip entries through
    it without seeking, so the sha256 costs no second read)."""

    def __init__(self, raw):
        self.raw, self.size, self.sha = raw, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha.update(data)
        n = memoryview(data).nbytes
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def read(self, *_):  # np.savez takes objects with `read` for open files
        raise io.UnsupportedOperation("write-only")

    def info(self) -> dict:
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


@contextmanager
def _output(path: str):
    """A hashing output stream; local files are fsynced before close, HDFS streams closed."""
    if fs.is_remote(path):
        with fs.open_output_stream(path) as raw:
            yield _HashingWriter(raw)
        return
    with open(path, "wb") as raw:
        w = _HashingWriter(raw)
        yield w
        raw.flush()
        os.fsync(raw.fileno())


def _fsync_dir(path: str) -> None:
    if fs.is_remote(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npz(path: str, arrays: dict) -> dict:
    with _output(path) as w:
        np.savez(w, **arrays)
    return w.info()


def _write_json(path: str, obj) -> dict:
    with _output(path) as w:
        w.write(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))
    return w.info()


def _read_bytes(path: str) -> bytes:
    with fs.open_input_file(path) as f:
        return f.read()


def _read_verified(path: str, manifest: dict) -> bytes:
    """The file's bytes, after checking size and sha256 against the checkpoint's manifest."""
    name = posixpath.basename(path) if fs.is_remote(path) else os.path.basename(path)
    expect = manifest.get("files", {}).get(name)
    if expect is None:
        raise CheckpointError(f"checkpoint file {path} is not listed in {COMMITTED}; the checkpoint "
                              f"is incomplete or was written by another world size")
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {exc}") from None
    if len(data) != expect["bytes"] or hashlib.sha256(data).hexdigest() != expect["sha256"]:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: {len(data)} bytes whose sha256 does not match the "
            f"{expect['bytes']} bytes recorded in {COMMITTED}; restore the file, or resume from an "
            f"older checkpoint with --checkpoint-dir <that ckpt-… directory>")
    return data


def _load_npz(path: str, manifest: dict) -> dict:
    """{name: array} of a verified .npz (no pickles)."""
    data = _read_verified(path, manifest)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any decoding failure names the file
        raise CheckpointError(f"checkpoint file {path} cannot be decoded: {type(exc).__name__}: {exc}") from None


def _read_json(path: str, manifest: dict | None = None):
    try:
        data = _read_verified(path, manifest) if manifest is not None else _read_bytes(path)
        return json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt (not JSON: {exc})") from None


def read_checkpoint_meta(path: str) -> tuple:
    """``(manifest, meta)`` of a committed checkpoint (meta.json verified against COMMITTED)."""
    manifest = _read_json(fs.join(path, COMMITTED))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {fs.join(path, COMMITTED)} is not a gmeta checkpoint "
                              f"manifest of format {FORMAT}")
    return manifest, _read_json(fs.join(path, META), manifest)


def _parent(path: str) -> str:
    path = path.rstrip("/")
    return posixpath.dirname(path) if fs.is_remote(path) else (os.path.dirname(path) or ".")


def _delete_dir(path: str) -> None:
    filesystem, inner = fs.resolve(path)
    filesystem.delete_dir(inner)


# ----------------------------------------------------------------------------- state by name
def _row_entries(embedding, state: dict) -> dict:
    """{table: [state names stored per row]}: ``table/<t>`` and its slots ``table/<t>/<slot>``."""
    out = {}
    for t in embedding.plan.tables:
        base = f"table/{t.name}"
        out[t.name] = [n for n in state
                       if n == base or (n.startswith(base + "/") and "/" not in n[len(base) + 1:])]
    return out


def _split_state(learner):
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
        variables, rows, _, _ = _split_state(learner)
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
        variables, _, others, _ = _split_state(learner)
        for n in others:
            arrays[f"{prefix}/{n}"] = variables[n].numpy()
    return arrays


def _assemble_rows(path: str, manifest: dict, meta: dict, wanted: dict) -> dict:
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
        data = _load_npz(file, manifest)
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


# ----------------------------------------------------------------------------- save / restore
def save_checkpoint(directory: str, step: int, learners: dict, comm, meta: dict, keep: int = 3,
                    session: str | None = None, log=None) -> str:
    """Write one checkpoint of ``learners`` ({"model": learner, "plain": learner}); every rank
    calls (one allgather_object). Returns the committed path (on every rank)."""
    name = checkpoint_name(step)
    session = session or "0"
    partial = fs.join(directory, f".{name}.partial-{session}")
    final = fs.join(directory, name)
    fs.make_dirs(partial)
    mine = {shard_name(comm.rank, comm.size): _write_npz(fs.join(partial, shard_name(comm.rank, comm.size)),
                                                          shard_arrays(learners, comm))}
    if comm.rank == 0:
        mine[DENSE] = _write_npz(fs.join(partial, DENSE), dense_arrays(learners))
    if not fs.is_remote(partial):
        _fsync_dir(partial)
    parts = comm.allgather_object(mine)  # the barrier: every rank's part is on disk
    if os.environ.get(DIE_IN_CHECKPOINT_ENV) == str(step):
        sys.stderr.write(f"[gmeta] test hook {DIE_IN_CHECKPOINT_ENV}: exiting inside checkpoint {name}\n")
        sys.stderr.flush()
        os._exit(3)
    if comm.rank == 0:
        files = {}
        for part in parts:
            files.update(part)
        for fname, info in files.items():
            got = fs.file_info(fs.join(partial, fname))
            if got.type == pafs.FileType.NotFound or got.size != info["bytes"]:
                raise CheckpointError(
                    f"checkpoint {final}: {fname} was written by another worker but rank 0 does not see it "
                    f"complete in {partial}; --checkpoint-dir must be on a filesystem every worker shares "
                    f"(a shared disk, NFS, HDFS)")
        plan = next(iter(learners.values())).embedding.plan
        body = dict(meta, format=FORMAT, step=int(step), world_size=comm.size, learners=sorted(learners),
                    tables={t.name: [t.num_rows, t.dim] for t in plan.tables}, written=time.time())
        files[META] = _write_json(fs.join(partial, META), body)
        _write_json(fs.join(partial, COMMITTED), {"format": FORMAT, "step": int(step), "files": files,
                                                   "written": body["written"]})
        _fsync_dir(partial)
        if _exists(final):  # a leftover of an older attempt at this step: replaced
            _delete_dir(final)
        fs.move(partial, final)
        _fsync_dir(directory)
        _prune(directory, keep, int(step), session)
        if log is not None:
            log(f"checkpoint {final} (step {step}, {sum(f['bytes'] for f in files.values()) / 1e6:.2f} MB)")
    return final


def _prune(directory: str, keep: int, step: int, session: str) -> None:
    """Keep the ``keep`` newest committed checkpoints (0: all); drop partial directories that no
    writer will finish (another session's, or this session's up to ``step``)."""
    if keep > 0:
        for _, path in committed_checkpoints(directory)[:-keep]:
            _delete_dir(path)
    for e in fs.list_dir(directory):
        m = _PARTIAL_RE.match(e.base_name)
        if m and (not e.base_name.endswith(f"-{session}") or int(m.group(1)) <= step):
            _delete_dir(fs.join(directory, e.base_name))


def restore_checkpoint(path: str, learners: dict, comm=None) -> dict:
    """Load a committed checkpoint into ``learners`` (re-sharded for this world size) and return
    its meta. Every name must match both ways (``gmeta.trainer.meta.state.assign_by_name``)."""
    manifest, meta = read_checkpoint_meta(path)
    missing = sorted(set(learners) - set(meta.get("learners", [])))
    if missing:
        raise CheckpointError(f"checkpoint {path} holds no state for {missing} (it has "
                              f"{meta.get('learners')}); was the plain baseline trained alongside?")
    dense = _load_npz(fs.join(path, DENSE), manifest)
    wanted, parts = {}, {}
    for prefix, learner in learners.items():
        variables, rows, others, _ = _split_state(learner)
        parts[prefix] = (variables, others)
        for table, names in rows.items():
            target = np.asarray(learner.embedding.state_rows(table), dtype=np.int64)
            templates = {n: (tuple(variables[n].shape), variables[n].dtype.as_numpy_dtype) for n in names}
            wanted[(prefix, table)] = (target, templates, learner.embedding.plan)
    assembled = _assemble_rows(path, manifest, meta, wanted)
    for prefix, learner in learners.items():
        variables, others = parts[prefix]
        values = {k[len(prefix) + 1:]: v for k, v in dense.items() if k.startswith(prefix + "/")}
        values.update({n: v for (p, n), v in assembled.items() if p == prefix})
        assign_by_name(variables, values, f"checkpoint {path} ({prefix})")
        learner.embedding.after_load()
        learner.model.load_plain_state(meta.get("plain_state", {}).get(prefix, {}))
    return meta


# ----------------------------------------------------------------------------- collective helpers
def _agree(comm, fn):
    """Run ``fn`` on rank 0 and give every rank its result, or raise its error on every rank (so
    no rank waits in a collective for a rank that failed)."""
    if comm.size == 1:
        return fn()
    if comm.rank == 0:
        try:
            out = ("ok", fn())
        except CheckpointError as exc:
            out = ("checkpoint", str(exc))
        except Exception as exc:  # noqa: BLE001 - reported on every rank
            out = ("error", f"{type(exc).__name__}: {exc}")
    else:
        out = None
    kind, value = comm.allgather_object(out)[0]
    if kind == "ok":
        return value
    raise CheckpointError(value) if kind == "checkpoint" else RuntimeError(value)


# ----------------------------------------------------------------------------- compatibility
def _normal(value):
    return json.loads(json.dumps(value, sort_keys=True))


def _diff(a, b, path="", out=None, limit=8):
    """Paths where two JSON values differ (at most ``limit``)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}{k} ({'only now' if k not in a else 'only in the checkpoint'})")
            else:
                _diff(a[k], b[k], f"{path}{k}.", out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}{i}.", out, limit)
    elif a != b:
        out.append(f"{path.rstrip('.')}: {json.dumps(a)[:80]} in the checkpoint, {json.dumps(b)[:80]} now")
    return out


def config_differences(saved: dict, current: dict, defaults: dict) -> list:
    """``field: X in the checkpoint, Y now`` for every run-defining field that differs."""
    diffs = []
    for name in sorted(current):
        if name in OPERATIONAL_FIELDS:
            continue
        was = _normal(saved.get(name, defaults.get(name)))
        now = _normal(current[name])
        if was != now:
            diffs.append(f"{name}: {json.dumps(was)} in the checkpoint, {json.dumps(now)} now")
    had_plain = saved.get("plain_baseline", "alongside") == "alongside"
    if current.get("meta") == "maml" and current.get("plain_baseline") == "alongside" and not had_plain:
        diffs.append("plain_baseline: the checkpoint has no plain network trained alongside; "
                     "resume with --plain-baseline off")
    return diffs


def check_compatible(path: str, meta: dict, cfg, schema_json: dict) -> None:
    """Raise a CheckpointError naming every difference that makes ``meta`` another run."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, this gmeta reads {FORMAT}")
    defaults = config_dict(TrainConfig(model="", data=""))
    diffs = config_differences(meta.get("config", {}), config_dict(cfg), defaults)
    schema_diffs = _diff(_normal(meta.get("schema")), _normal(schema_json), "schema.")
    diffs += schema_diffs
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: it was written by another model, config or dataset schema; "
            f"differences: {'; '.join(diffs)}. Resume with the checkpoint's flags, or start a new run "
            f"from its weights with --init-from {path}")
    position = meta["position"]
    if position["epoch"] > cfg.epochs:
        raise CheckpointError(f"cannot resume from {path}: it is at epoch {position['epoch']} but --epochs "
                              f"is {cfg.epochs}")


# ----------------------------------------------------------------------------- --resume discovery
def find_resume_checkpoint(cfg) -> str:
    """The checkpoint ``--resume`` continues: the newest committed one in ``--checkpoint-dir`` (or
    that directory itself when it is one ``ckpt-…``), else in the one unfinished run under
    ``--output-dir`` with checkpoints (the most recently written when there are several)."""
    if cfg.checkpoint_dir:
        d = cfg.checkpoint_dir
        if is_checkpoint(d):
            return d
        if not _is_dir(d):
            raise CheckpointError(f"--resume: the checkpoint directory {d} does not exist")
        latest = latest_checkpoint(d)
        if latest is None:
            partial = [e.base_name for e in fs.list_dir(d) if _PARTIAL_RE.match(e.base_name)]
            raise CheckpointError(f"--resume: no committed checkpoint in {d}"
                                  + (f" (only unfinished writes: {', '.join(partial)})" if partial else ""))
        return latest
    root = cfg.output_dir
    candidates = []
    try:
        runs = [e for e in fs.list_dir(root) if e.type == pafs.FileType.Directory]
    except (FileNotFoundError, NotADirectoryError):
        runs = []
    for run in runs:
        d = fs.join(root, run.base_name, "checkpoints")
        latest = latest_checkpoint(d)
        if latest is None or _exists(fs.join(d, FINISHED)):
            continue
        manifest = _read_json(fs.join(latest, COMMITTED))
        candidates.append((float(manifest.get("written", 0.0)), latest))
    if not candidates:
        raise CheckpointError(f"--resume: no unfinished run with a committed checkpoint under "
                              f"{fs.join(root, '*', 'checkpoints')}; pass --checkpoint-dir DIR")
    return max(candidates)[1]


# ----------------------------------------------------------------------------- --init-from
class _WeightSource:
    """Trained weights by name: an export directory or a checkpoint."""

    def __init__(self, source: str, tracking_uri):
        self.source = source
        self.checkpoint = None
        if is_checkpoint(source):
            self.checkpoint = source
        elif _is_dir(source) and latest_checkpoint(source):
            self.checkpoint = latest_checkpoint(source)
        elif _is_dir(source) and latest_checkpoint(fs.join(source, "checkpoints")):
            self.checkpoint = latest_checkpoint(fs.join(source, "checkpoints"))
        if self.checkpoint is not None:
            self.kind, self.where = "checkpoint", self.checkpoint
            self.manifest, self.meta = read_checkpoint_meta(self.checkpoint)
            dense = _load_npz(fs.join(self.checkpoint, DENSE), self.manifest)
            self.values = {k[len("model/"):]: v for k, v in dense.items() if k.startswith("model/")}
            self.tables = {name: tuple(shape) for name, shape in self.meta.get("tables", {}).items()}
            return

        self.kind, self.where = "export", resolve_export_dir(source, tracking_uri)
        with np.load(os.path.join(self.where, "dense.npz"), allow_pickle=False) as z:
            self.values = {k: z[k] for k in z.files}
        with open(os.path.join(self.where, EXPORT_FILE)) as f:
            self.tables = {n: tuple(s) for n, s in json.load(f).get("tables", {}).items()}
        self._embeddings = None

    def table_rows(self, table: str, rows: np.ndarray, plan) -> np.ndarray:
        if self.kind == "export":
            if self._embeddings is None:
                with np.load(os.path.join(self.where, "embeddings.npz"), allow_pickle=False) as z:
                    self._embeddings = {k: z[k] for k in z.files}
            return self._embeddings[table][rows]
        name = f"table/{table}"
        got = _assemble_rows(self.checkpoint, self.manifest, self.meta,
                             {("model", table): (rows, {name: ((rows.size, plan.table(table).dim), np.float32)},
                                                 plan)})
        return got[("model", f"table/{table}")]


def init_from(source: str, learners: dict, tracking_uri, log) -> dict:
    """Copy every model variable and table whose name (and shape) exists in both ``source`` and
    each learner; optimizer state stays fresh. Returns ``{learner: {"loaded": [...], "left":
    [...]}}`` and logs which names were loaded and which kept their initial values."""
    src = _WeightSource(source, tracking_uri)
    report = {}
    for prefix, learner in learners.items():
        state = run_state(learner)
        loaded, left = [], []
        for name, var in sorted(state.model_variables().items()):
            value = src.values.get(name)
            if value is not None and tuple(value.shape) == tuple(var.shape):
                var.assign(value)
                loaded.append(name)
            else:
                left.append(name if value is None else f"{name} (shape {list(value.shape)} there, "
                                                         f"{var.shape.as_list()} here)")
        emb = learner.embedding
        for t in emb.plan.tables:
            name = f"table/{t.name}"
            shape = src.tables.get(t.name)
            if shape is not None and tuple(shape) == (t.num_rows, t.dim):
                rows = np.asarray(emb.state_rows(t.name), dtype=np.int64)
                emb.state_variables()[name].assign(src.table_rows(t.name, rows, emb.plan))
                loaded.append(name)
            else:
                left.append(name if shape is None else f"{name} (shape {list(shape)} there, "
                                                         f"{[t.num_rows, t.dim]} here)")
        emb.after_load()
        unused = sorted(n for n in set(src.values) - set(state.model_variables())
                        if not n.startswith(OPTIMIZER_PREFIXES))
        report[prefix] = {"loaded": loaded, "left": left}
        who = "model" if prefix == "model" else "plain baseline (trained alongside)"
        log(f"--init-from {source} ({src.kind} {src.where}) into the {who}: loaded {len(loaded)} "
            f"[{', '.join(loaded)}]; left at initial values: {', '.join(left) or 'none'}"
            + (f"; not in this model: {', '.join(unused)}" if unused else ""))
    return report


# ----------------------------------------------------------------------------- one run's policy
def _refuse_old_checkpoints(comm, directory: str) -> None:
    """A new run must not write into a directory holding another run's checkpoints: its
    ``latest`` would then be ambiguous."""
    existing = _agree(comm, lambda: latest_checkpoint(directory))
    if existing:
        raise CheckpointError(
            f"--checkpoint-dir {directory} already holds checkpoints of another run (newest {existing}); "
            f"pass --resume to continue that run, or choose another --checkpoint-dir")


class RunCheckpoints:
    """Where and when a run checkpoints, and what it resumes from.

    ``open`` (before MLflow starts: a resumed run continues the same MLflow run) finds and checks
    the checkpoint to resume; ``start`` decides the run and checkpoint directories (the same on
    every rank) and loads the state (``--resume``) or the initial weights (``--init-from``);
    ``fit`` reads ``resume_point`` and calls ``step_done`` / ``epoch_done``; ``finish`` marks the
    run complete. Every method is called on every rank in the same order.
    """

    def __init__(self, cfg, comm, log, resume_path=None, resume_meta=None):
        self.cfg, self.comm, self.log = cfg, comm, log
        self.enabled = cfg.checkpoint_dir.lower() != "none"
        self.resume_path, self.resume_meta = resume_path, resume_meta
        self.resume_point = None
        self.directory = None
        self.run_dir = None
        self.learners = {}
        self.meta_base = {}
        self.session = "0"
        self._last_save = time.monotonic()
        self._saved_steps = set()

    @classmethod
    def open(cls, cfg, comm, log, schema) -> "RunCheckpoints":
        if not cfg.resume:
            if cfg.checkpoint_dir and cfg.checkpoint_dir.lower() != "none":
                _refuse_old_checkpoints(comm, cfg.checkpoint_dir)
            return cls(cfg, comm, log)
        if cfg.checkpoint_dir.lower() == "none":
            raise CheckpointError("--resume needs checkpoints; --checkpoint-dir none turns them off")

        def find():
            path = find_resume_checkpoint(cfg)
            _, meta = read_checkpoint_meta(path)
            if _exists(fs.join(_parent(path), FINISHED)) and meta["position"]["epoch"] >= cfg.epochs:
                raise CheckpointError(
                    f"--resume: the run of {path} finished all {meta['position']['epoch']} epochs; nothing to "
                    f"resume. Raise --epochs to train it further, or start a new run from it with "
                    f"--init-from {path}")
            return path, meta

        path, meta = _agree(comm, find)
        check_compatible(path, meta, cfg, schema.to_json())
        return cls(cfg, comm, log, path, meta)

    @property
    def resumed(self) -> bool:
        return self.resume_path is not None

    @property
    def mlflow_run_id(self):
        return self.resume_meta.get("mlflow_run_id") if self.resumed else None

    # ---- start ----
    def start(self, run_id, learner, plain, train_input) -> None:
        cfg, comm = self.cfg, self.comm
        self.learners = {"model": learner, **({"plain": plain} if plain is not None else {})}
        if self.resumed:
            self.directory = _parent(self.resume_path)
            self.run_dir = self.resume_meta.get("run_dir") or _parent(self.directory)
        else:
            self.run_dir = _agree(comm, lambda: os.path.join(
                cfg.output_dir, run_id or time.strftime("local-%Y%m%d-%H%M%S")))
            self.directory = cfg.checkpoint_dir or fs.join(self.run_dir, "checkpoints")
        self.session = _agree(comm, lambda: uuid.uuid4().hex[:8])
        reader = getattr(train_input, "reader", None)
        tasks = sum(u.tasks for u in reader.units) if reader is not None else None
        self.meta_base = {
            "model": cfg.model, "config": self._config(), "schema": learner.model.schema.to_json(),
            "plain_state": {}, "mlflow_run_id": run_id or self.mlflow_run_id, "run_dir": self.run_dir,
            "placement": "row r on rank r % world_size",
            "rng": {"seed": cfg.seed, "tf_global_seed": cfg.seed,
                    "reader": "stateless: numpy default_rng([seed, epoch, rank, stream]) per epoch",
                    "init": "stateless: embedding rows and dense layers are functions of the seed"},
            "steps_per_epoch": train_input.steps_per_epoch, "train_tasks": tasks,
        }
        if self.resumed:
            self._restore(train_input, tasks)
            return
        if self.enabled and not cfg.checkpoint_dir:  # (an explicit directory was checked by open)
            _refuse_old_checkpoints(comm, self.directory)
        if cfg.init_from:
            init_from(cfg.init_from, self.learners, cfg.tracking_uri, self.log)

    def _config(self) -> dict:
        return _normal(config_dict(self.cfg))

    def _restore(self, train_input, tasks) -> None:
        meta = self.resume_meta
        t0 = time.time()
        restore_checkpoint(self.resume_path, self.learners, self.comm)
        position = dict(meta["position"])
        old_n, n = int(meta["world_size"]), self.comm.size
        same_input = meta.get("train_tasks") in (None, tasks)
        if not same_input:
            raise CheckpointError(f"cannot resume from {self.resume_path}: the training split now has {tasks} "
                                  f"tasks, the checkpoint was written for {meta.get('train_tasks')}; the data "
                                  f"changed")
        steps = train_input.steps_per_epoch
        if old_n == n and meta.get("steps_per_epoch") != steps:
            raise CheckpointError(f"cannot resume from {self.resume_path}: {steps} steps per epoch now, "
                                  f"{meta.get('steps_per_epoch')} when it was written; the data changed")
        note, sums = "", dict(meta["epoch_sums"])
        if old_n != n:
            note = f"; re-sharded from {old_n} to {n} worker(s)"
            if position["step_in_epoch"]:
                was = position["step_in_epoch"]
                scaled = int(round(was * steps / max(meta["steps_per_epoch"], 1)))
                position["step_in_epoch"] = max(1, min(steps, scaled))
                # the epoch's mean loss so far stays what it was
                sums = {k: v * position["step_in_epoch"] / was for k, v in sums.items()}
                self.log(f"WARNING: resuming mid-epoch on {n} instead of {old_n} worker(s): epoch "
                         f"{position['epoch']} continues at step {position['step_in_epoch']}/{steps} (was "
                         f"{was}/{meta['steps_per_epoch']}); the workers' shares of the data differ, so the "
                         f"rest of this epoch is not exactly the tasks the interrupted run had left")
        newer = [p for step, p in committed_checkpoints(self.directory) if step > position["global_step"]]
        if newer:
            self.log(f"WARNING: {self.directory} also holds newer checkpoints ({', '.join(newer)}); this run "
                     f"replaces each of them when it passes its step")
        self.resume_point = {"position": position, "history": meta["history"], "epoch_sums": sums}
        self._saved_steps.add(int(position["global_step"]))
        if self.comm.rank == 0 and _exists(fs.join(self.directory, FINISHED)):
            fs.delete_file(fs.join(self.directory, FINISHED))
        self.log(f"resumed from {self.resume_path}: epoch {position['epoch']} after step "
                 f"{position['step_in_epoch']}/{steps}, global step {position['global_step']}"
                 + (f", MLflow run {meta.get('mlflow_run_id')}" if meta.get("mlflow_run_id") else "")
                 + f"{note} ({time.time() - t0:.1f} s)")

    # ---- during fit ----
    def step_done(self, snapshot, global_step: int, last_of_epoch: bool) -> None:
        """After every training step (every rank): save when ``--checkpoint-every-steps`` or
        ``--checkpoint-every-secs`` says so (the epoch end saves anyway)."""
        if self.enabled and not last_of_epoch:
            due = bool(self.cfg.checkpoint_every_steps) and global_step % self.cfg.checkpoint_every_steps == 0
            if self.cfg.checkpoint_every_secs > 0:
                late = time.monotonic() - self._last_save >= self.cfg.checkpoint_every_secs
                due = any(self.comm.allgather_object(late)) or due
            if due:
                self.save(snapshot())
        if os.environ.get(PAUSE_AT_STEP_ENV) == str(global_step):
            if self.comm.rank == 0:
                sys.stderr.write(f"[gmeta] test hook {PAUSE_AT_STEP_ENV}: pausing after step {global_step}\n")
                sys.stderr.flush()
            while True:
                time.sleep(1)

    def epoch_done(self, snapshot) -> None:
        if self.enabled:
            self.save(snapshot())

    def save(self, snapshot: dict) -> str | None:
        step = int(snapshot["position"]["global_step"])
        if step in self._saved_steps:
            return None
        meta = dict(self.meta_base, **snapshot)
        meta["plain_state"] = {p: dict(learner.model.plain_state()) for p, learner in self.learners.items()}
        path = save_checkpoint(self.directory, step, self.learners, self.comm, _normal(meta),
                               keep=self.cfg.keep_checkpoints, session=self.session, log=self.log)
        self._saved_steps.add(step)
        self._last_save = time.monotonic()
        return path

    def latest(self):
        """The newest committed checkpoint of this run's directory (None when there is none)."""
        return latest_checkpoint(self.directory) if self.directory else None

    def finish(self) -> None:
        """Mark the run complete (``--resume`` without a directory then looks past it)."""
        if self.enabled and self.comm.rank == 0 and self.directory and _is_dir(self.directory):
            fs.write_text_atomic(fs.join(self.directory, FINISHED), json.dumps({"finished": time.time()}))
