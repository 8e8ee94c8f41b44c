"""Writing one checkpoint: every rank's part, one agreement, an atomic commit, pruning.

Every rank issues the same collectives in the same order: each rank writes its shard file
(fsync), rank 0 also ``dense.npz``; ONE ``allgather_object`` of the files' sizes and checksums
is the barrier that every part is on disk; rank 0 then writes ``meta.json`` and ``COMMITTED``,
fsyncs and renames the partial directory to ``ckpt-<step>`` (atomic on POSIX and HDFS), then
prunes to ``--keep-checkpoints``. A kill at any point leaves the previous checkpoint the newest
committed one (``latest_checkpoint``).
"""

from __future__ import annotations

import time

import pyarrow.fs as pafs

from gmeta.io import fs
from gmeta.trainer.checkpoint.assemble import dense_arrays, shard_arrays
from gmeta.trainer.checkpoint.files import (
    COMMITTED,
    DENSE,
    FORMAT,
    META,
    PARTIAL_RE,
    CheckpointError,
    checkpoint_name,
    committed_checkpoints,
    delete_dir,
    exists,
    fsync_dir,
    shard_name,
    write_json,
    write_npz,
)
from gmeta.trainer.parallel.faults import fault_point


def save_checkpoint(directory: str, step: int, learners: dict, comm, meta: dict, keep: int = 3,
                    session: str | None = None, log=None) -> str:
    """Write one checkpoint of ``learners`` ({"model": learner, "plain": learner}); every rank
    calls (one allgather_object). Returns the committed path (on every rank)."""
    t0 = time.monotonic()
    name = checkpoint_name(step)
    session = session or "0"
    partial = fs.join(directory, f".{name}.partial-{session}")
    final = fs.join(directory, name)
    fs.make_dirs(partial)
    mine = {shard_name(comm.rank, comm.size): write_npz(fs.join(partial, shard_name(comm.rank, comm.size)),
                                                         shard_arrays(learners, comm))}
    if comm.rank == 0:
        mine[DENSE] = write_npz(fs.join(partial, DENSE), dense_arrays(learners))
    if not fs.is_remote(partial):
        fsync_dir(partial)
    parts = comm.allgather_object(mine)  # the barrier: every rank's part is on disk
    fault_point("checkpoint_commit", step=int(step), rank=comm.rank)
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
        files[META] = write_json(fs.join(partial, META), body)
        write_json(fs.join(partial, COMMITTED), {"format": FORMAT, "step": int(step), "files": files,
                                                  "written": body["written"]})
        fsync_dir(partial)
        if exists(final):  # a leftover of an older attempt at this step: replaced
            delete_dir(final)
        fs.move(partial, final)
        fsync_dir(directory)
        _prune(directory, keep, int(step), session)
        if log is not None:
            log(f"checkpoint {final} (step {step}, {sum(f['bytes'] for f in files.values()) / 1e6:.2f} MB, "
                f"{time.monotonic() - t0:.2f} s)")
    return final


def _prune(directory: str, keep: int, step: int, session: str) -> None:
    """Keep the ``keep`` newest committed checkpoints (0: all); drop partial directories that no
    writer will finish (another session's, or this session's up to ``step``)."""
    if keep > 0:
        for _, path in committed_checkpoints(directory)[:-keep]:
            delete_dir(path)
    for e in fs.list_dir(directory):
        m = PARTIAL_RE.match(e.base_name)
        if m and (not e.base_name.endswith(f"-{session}") or int(m.group(1)) <= step):
            delete_dir(fs.join(directory, e.base_name))
