"""Elastic training: a job that keeps going while hosts come and go (horovodrun ``--min-np``,
``--max-np``, ``--host-discovery-script``).

The state that survives a reset is the run's whole state, and it survives in the checkpoint
store, not in memory: a lost host takes its embedding shards with it, so the rows it owned can
only come from a copy made before. Every ``--checkpoint-every-steps K`` steps (and at every
epoch end, and once before the first step) every rank commits a checkpoint (dense variables,
optimizer slots, its shard of every table with the row-optimizer slots, the reader's position);
a reset = every rank, survivors and newcomers alike, loads the LAST COMMIT re-sharded for the new
world size (``gmeta.trainer.checkpoint.assemble``) and continues from its position, in the same
MLflow run. The steps after the last commit are trained again.

What triggers a reset, on every rank alike:

* a collective fails (a peer died, its host dropped off the network and Gloo timed out): Horovod
  reports it as its own error, or, inside a traced step or an AlltoAll, as a TensorFlow error
  from a Horovod op (``comm.elastic_recoverable`` maps both);
* the driver announces added or removed hosts: rank 0 hears it, and at the next commit one
  broadcast tells every rank (``Communicator.check_membership``), so all leave at the same step,
  with nothing to redo.

Then each rank leaves the Horovod world and blocks in the driver's rendezvous until the new one
is formed (``Communicator.rejoin``), and the whole run is built again for the new rank and world
size: sharding plan, tables, reader, traced steps. Newcomers start like any worker; the first
collective of every attempt (``Elastic.agree``) tells them which checkpoint directory to resume.

Any other error ends the job, as without elastic: the rank that raised it records it next to
the checkpoints (``ELASTIC_FAILED``) before it exits, and the survivors, once rejoined, find it
and stop with it instead of carrying on without that rank.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from gmeta.io import fs
from gmeta.trainer.checkpoint.files import exists
from gmeta.trainer.parallel.comm import elastic_recoverable, init_communicator
from gmeta.trainer.parallel.launch import one_line
from gmeta.trainer.parallel.signals import Stopped
from gmeta.trainer.run.epoch_state import EpochState

#: a non-recoverable failure of one rank, written next to the run's checkpoints for the others
FAILED_MARKER = "ELASTIC_FAILED"


class Elastic:
    """One worker's memory across the resets of an elastic job (see the module docstring)."""

    def __init__(self):
        self.generation = 0  # resets this job has been through (the highest any rank knows)
        self.directory = None  # the run's checkpoint directory, once its first commit exists
        self.epochs = None  # the run's resolved --epochs (``auto`` depends on the world size)
        self.comm = None

    # ---- every attempt ----
    def agree(self, cfg, comm):
        """The first collective of every attempt: ranks that know the run (survivors of a reset)
        tell the others (newcomers) which checkpoint directory to resume from. Returns the config
        of this attempt; raises the failure another rank recorded, if one did."""
        self.comm = comm
        if cfg.checkpoint_dir.lower() == "none":
            raise ValueError("an elastic job resumes from its checkpoints after every reset: --checkpoint-dir none "
                             "is not allowed under horovodrun --min-np/--max-np/--host-discovery-script")
        views = comm.allgather_object((self.generation, self.directory, self.epochs))
        known = [v for v in views if v[1]]
        if not known:
            return cfg
        self.generation, self.directory, self.epochs = max(known)
        marker = fs.join(self.directory, FAILED_MARKER)
        if exists(marker):
            failure = json.loads(fs.read_text(marker))
            raise RuntimeError(f"elastic job ended: rank {failure['rank']} failed with an error a reset does not "
                               f"repair ({failure['error']}); fix the cause, then relaunch with --resume "
                               f"--checkpoint-dir {self.directory}")
        return dataclasses.replace(cfg, resume=True, checkpoint_dir=self.directory, init_from="", epochs=self.epochs)

    def started(self, cfg, checkpoints, reader, plain) -> None:
        """After the checkpoints started (every rank): a new run commits its step 0 at once, so
        a reset always has a commit to return to; every later commit checks the membership."""
        self.directory = checkpoints.directory
        self.epochs = cfg.epochs
        if self.generation == 0 and self.comm.rank == 0:  # a failure of an earlier job does not count
            marker = fs.join(self.directory, FAILED_MARKER)
            if exists(marker):
                fs.delete_file(marker)
        if not checkpoints.resumed:
            checkpoints.save(EpochState(reader.steps_per_epoch, plain is not None).snapshot())
        checkpoints.on_commit = self._committed

    def _committed(self, path: str) -> None:
        self.comm.check_membership()  # MembershipChanged on every rank alike

    def record_failure(self, exc: BaseException, rank: int) -> None:
        """A non-recoverable error of this rank, for the survivors to end the job with."""
        if self.directory is None:
            return
        marker = fs.join(self.directory, FAILED_MARKER)
        try:
            if not exists(marker):
                fs.write_text_atomic(marker, json.dumps({"rank": rank, "error": one_line(exc), "time": time.time()}))
        except OSError:
            pass  # the survivors then carry on without this rank


def run_elastic(cfg, attempt, one_gpu_per_process: bool = False):
    """Run ``attempt(comm, elastic)`` (the whole training run) until it returns; after a
    recoverable failure rejoin the next world and run it again from the last commit."""
    comm = init_communicator(cfg.comm, one_gpu_per_process=one_gpu_per_process, elastic=True)
    elastic = Elastic()
    while True:
        try:
            return attempt(comm, elastic)
        except Stopped:
            raise
        except BaseException as exc:  # noqa: BLE001 - sorted into resets and failures here
            if not elastic_recoverable(exc):
                elastic.record_failure(exc, comm.rank)
                raise
            t0, was = time.monotonic(), (comm.rank, comm.size)
            _say(f"[gmeta rank {comm.rank}] elastic reset: {one_line(exc)}; rejoining (was rank {was[0]} of "
                 f"{was[1]})")
            comm = comm.rejoin()
            elastic.generation += 1
            if comm.rank == 0:
                _say(f"[gmeta] elastic reset {elastic.generation}: {comm.size} worker(s) (was {was[1]}), formed in "
                     f"{time.monotonic() - t0:.1f} s; resuming from the last commit")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
