"""Checkpoint files: the on-disk format, atomic writes with checksums, verified reads, listing.

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

Every file read back is checked against the manifest's sha256 first; a mismatch names the file.
How the files are written and committed is ``save``; how their arrays become state, ``assemble``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
from contextlib import contextmanager

import numpy as np
import pyarrow.fs as pafs

from gmeta.io import fs

FORMAT = 1
CKPT_PREFIX = "ckpt-"
COMMITTED = "COMMITTED"
META = "meta.json"
DENSE = "dense.npz"
FINISHED = "FINISHED"
ROWS = "@rows/"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
PARTIAL_RE = re.compile(r"^\.ckpt-(\d+)\.partial-[0-9a-f]+$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match this run; the message says which."""


# ----------------------------------------------------------------------------- names and listing
def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{int(step):09d}"


def shard_name(rank: int, size: int) -> str:
    return f"shard-{int(rank):05d}-of-{int(size):05d}.npz"


def exists(path: str) -> bool:
    return fs.file_info(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
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
            if exists(fs.join(path, COMMITTED)):
                out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(directory: str):
    """The newest committed checkpoint in ``directory`` (a path), or None."""
    found = committed_checkpoints(directory)
    return found[-1][1] if found else None


def is_checkpoint(path: str) -> bool:
    """True for one committed checkpoint directory (``ckpt-<step>`` with its COMMITTED)."""
    return exists(fs.join(path, COMMITTED))


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


def fsync_dir(path: str) -> None:
    if fs.is_remote(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_npz(path: str, arrays: dict) -> dict:
    with _output(path) as w:
        np.savez(w, **arrays)
    return w.info()


def write_json(path: str, obj) -> dict:
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


def load_npz(path: str, manifest: dict) -> dict:
    """{name: array} of a verified .npz (no pickles)."""
    data = _read_verified(path, manifest)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any decoding failure names the file
        raise CheckpointError(f"checkpoint file {path} cannot be decoded: {type(exc).__name__}: {exc}") from None


def read_json(path: str, manifest: dict | None = None):
    try:
        data = _read_verified(path, manifest) if manifest is not None else _read_bytes(path)
        return json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt (not JSON: {exc})") from None


def read_checkpoint_meta(path: str) -> tuple:
    """``(manifest, meta)`` of a committed checkpoint (meta.json verified against COMMITTED)."""
    manifest = read_json(fs.join(path, COMMITTED))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {fs.join(path, COMMITTED)} is not a gmeta checkpoint "
                              f"manifest of format {FORMAT}")
    return manifest, read_json(fs.join(path, META), manifest)


def parent(path: str) -> str:
    path = path.rstrip("/")
    return posixpath.dirname(path) if fs.is_remote(path) else (os.path.dirname(path) or ".")


def delete_dir(path: str) -> None:
    filesystem, inner = fs.resolve(path)
    filesystem.delete_dir(inner)


def normal_json(value):
    """``value`` as it reads back from meta.json (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, sort_keys=True))
