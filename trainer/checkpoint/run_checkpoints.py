"""One run's checkpoints: where they go, when they are taken, what the run resumes from.

``RunCheckpoints`` is the run's side of checkpointing (see its docstring); ``find_resume_checkpoint``
is what ``--resume`` continues. Decisions that every rank must share (the checkpoint to resume,
the run directory, the writer's session id) are taken on rank 0 and handed to every rank
(``_agree``), errors included, so no rank waits in a collective for one that failed.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pyarrow.fs as pafs

from gmeta.io import fs
from gmeta.trainer.checkpoint.assemble import restore_checkpoint
from gmeta.trainer.checkpoint.compat import check_compatible
from gmeta.trainer.checkpoint.files import (
    COMMITTED,
    FINISHED,
    PARTIAL_RE,
    CheckpointError,
    committed_checkpoints,
    exists,
    is_checkpoint,
    is_dir,
    latest_checkpoint,
    normal_json,
    parent,
    read_checkpoint_meta,
    read_json,
)
from gmeta.trainer.checkpoint.init_from import init_from
from gmeta.trainer.checkpoint.save import save_checkpoint
from gmeta.trainer.config import config_dict


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


# ----------------------------------------------------------------------------- --resume discovery
def find_resume_checkpoint(cfg) -> str:
    """The checkpoint ``--resume`` continues: the newest committed one in ``--checkpoint-dir`` (or
    that directory itself when it is one ``ckpt-…``), else in the one unfinished run under
    ``--output-dir`` with checkpoints (the most recently written when there are several)."""
    if cfg.checkpoint_dir:
        d = cfg.checkpoint_dir
        if is_checkpoint(d):
            return d
        if not is_dir(d):
            raise CheckpointError(f"--resume: the checkpoint directory {d} does not exist")
        latest = latest_checkpoint(d)
        if latest is None:
            partial = [e.base_name for e in fs.list_dir(d) if PARTIAL_RE.match(e.base_name)]
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
        if latest is None or exists(fs.join(d, FINISHED)):
            continue
        manifest = read_json(fs.join(latest, COMMITTED))
        candidates.append((float(manifest.get("written", 0.0)), latest))
    if not candidates:
        raise CheckpointError(f"--resume: no unfinished run with a committed checkpoint under "
                              f"{fs.join(root, '*', 'checkpoints')}; pass --checkpoint-dir DIR")
    return max(candidates)[1]


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
        self.on_commit = None  # called with the path after every step/epoch commit (elastic jobs)

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
            if exists(fs.join(parent(path), FINISHED)) and meta["position"]["epoch"] >= cfg.epochs:
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
            self.directory = parent(self.resume_path)
            self.run_dir = self.resume_meta.get("run_dir") or parent(self.directory)
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
            init_from(cfg.init_from, self.learners, cfg.tracking_uri, self.log, data=cfg.data)

    def _config(self) -> dict:
        return normal_json(config_dict(self.cfg))

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
        if self.comm.rank == 0 and exists(fs.join(self.directory, FINISHED)):
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
                self._committed(self.save(snapshot()))

    def epoch_done(self, snapshot) -> None:
        if self.enabled:
            self._committed(self.save(snapshot()))

    def _committed(self, path) -> None:
        if path is not None and self.on_commit is not None:
            self.on_commit(path)

    def save(self, snapshot: dict) -> str | None:
        step = int(snapshot["position"]["global_step"])
        if step in self._saved_steps:
            return None
        meta = dict(self.meta_base, **snapshot)
        meta["plain_state"] = {p: dict(learner.model.plain_state()) for p, learner in self.learners.items()}
        path = save_checkpoint(self.directory, step, self.learners, self.comm, normal_json(meta),
                               keep=self.cfg.keep_checkpoints, session=self.session, log=self.log)
        self._saved_steps.add(step)
        self._last_save = time.monotonic()
        return path

    def latest(self):
        """The newest committed checkpoint of this run's directory (None when there is none)."""
        return latest_checkpoint(self.directory) if self.directory else None

    def finish(self) -> None:
        """Mark the run complete (``--resume`` without a directory then looks past it)."""
        if self.enabled and self.comm.rank == 0 and self.directory and is_dir(self.directory):
            fs.write_text_atomic(fs.join(self.directory, FINISHED), json.dumps({"finished": time.time()}))
