"""The training loop: epochs of meta-steps with progress, guards and input-wait accounting.

The plain network (``--plain-baseline alongside``) steps on the same batches right after the
model, so both see identical data; its collectives are counted on a communicator of its own so
the reported communication per step is the model's alone. Every rank sees the same (global)
loss, so the guards stop every rank at the same step, with the same message. Checkpoints
(``gmeta.trainer.checkpoint.store``) are taken between steps and at every epoch end, on every rank at
the same step; a resumed run starts at the first batch the interrupted one had not trained.
"""

from __future__ import annotations

import math
import os
import time

import tensorflow as tf

from gmeta.trainer.meta.learner import batch_spec
from gmeta.trainer.run.signals import Stopped, signal_name


class TrainingDiverged(RuntimeError):
    """The loss went NaN/inf or rose past the tolerance; the message says what to change."""


def fit(learner, reader, cfg, comm, log, tracker, plain=None, after_epoch=None, checkpoints=None,
        signals=None) -> dict:
    """Train ``cfg.epochs`` epochs; ``after_epoch(epoch)`` runs on every rank after each epoch
    (validation; it may raise to stop, e.g. a pruned tuning trial, or return True to end training
    after this epoch, early stopping: it decides from the same report on every rank).

    ``checkpoints`` (``gmeta.trainer.checkpoint.store.RunCheckpoints``): its ``resume_point`` (when the
    run resumes) gives the position, the loss history and the interrupted epoch's running sums,
    so the run continues with the first batch not yet trained and the guards see the same
    history; ``step_done`` / ``epoch_done`` save checkpoints of that same state.
    """
    comm.counters.reset()
    step_fn = plain_fn = None
    wait_s, busy_s, steps_here = 0.0, 0.0, 0
    start = checkpoints.resume_point if checkpoints is not None else None
    if start is not None:
        first_epoch, first_step = start["position"]["epoch"], start["position"]["step_in_epoch"]
        global_step = start["position"]["global_step"]
        history = {k: (list(v) if isinstance(v, list) else v) for k, v in start["history"].items()}
        sums = dict(start["epoch_sums"])
    else:
        first_epoch, first_step, global_step = 0, 0, 0
        history = {"loss": [], "plain_loss": []} if plain is not None else {"loss": []}
        sums = {"loss": 0.0, "plain_loss": 0.0}
    steps = reader.steps_per_epoch
    batches = iter(all_epochs(reader, cfg.epochs, first_epoch, first_step))
    window = StepWindow(cfg.log_every, comm.size)
    step_log = []  # (not in checkpoints: timings differ between a run and its resumption)
    fail_at, stop_after = _injected_failure(comm.rank), None
    if signals is not None:
        signals.in_loop = True
    for epoch in range(first_epoch, cfg.epochs):
        if epoch == first_epoch and first_step:
            epoch_loss, plain_loss, n = sums["loss"], sums["plain_loss"], first_step
        else:
            epoch_loss, plain_loss, n = 0.0, 0.0, 0
        t_epoch = time.time()

        def snapshot(epoch=epoch):
            done = n >= steps
            return {"position": {"epoch": epoch + 1 if done else epoch, "step_in_epoch": 0 if done else n,
                                 "global_step": global_step, "steps_per_epoch": steps},
                    "history": history,
                    "epoch_sums": {"loss": 0.0 if done else epoch_loss, "plain_loss": 0.0 if done else plain_loss}}

        while n < steps:
            t0 = time.perf_counter()
            batch = _next_batch(batches, reader)
            t1 = time.perf_counter()
            if step_fn is None:
                step_fn = learner.compiled_train_step(batch_spec(batch))
                plain_fn = plain.compiled_train_step(batch_spec(batch)) if plain is not None else None
            comm.stop.arm()
            out = step_fn(batch)
            loss = float(out["loss"])
            t2 = time.perf_counter()
            if plain_fn is not None:
                plain_loss += float(plain_fn(batch)["loss"])
            traced = steps_here == 0  # the first step includes tracing
            if not traced:
                wait_s += t1 - t0
                busy_s += t2 - t1
            global_step += 1
            steps_here += 1
            if global_step == fail_at:
                raise RuntimeError(f"test hook {FAIL_AT_ENV}: injected failure after global step {global_step}")
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"the training loss became {loss} at epoch {epoch} step {n + 1}; lower --outer-lr "
                    f"or --inner-lr, or set --clip-norm / --inner-clip")
            if global_step == 1:
                history["first_step_loss"] = loss  # the untrained model's loss: a reference
            epoch_loss += loss
            n += 1
            window.add(loss, float(out["tasks"]), 0.0 if traced else t2 - t0)
            if window.due(global_step, last_of_epoch=n >= steps):
                point = window.take(global_step)
                step_log.append(point)
                tracker.log_metrics({"step_loss": point["loss"], "tasks_per_s": point["tasks_per_s"]},
                                    step=global_step, synchronous=False)
                if cfg.log_every:
                    log(f"epoch {epoch} step {n}/{steps} loss {point['loss']:.4f} "
                        f"({point['tasks_per_s']:,.0f} real tasks/s over {comm.size} worker(s))")
            if float(out["stop"]) > 0:
                stop_after = (global_step, epoch, n, steps)
                if n < steps:  # (at an epoch's last step, the epoch's end is recorded first)
                    _stop(checkpoints, snapshot, comm, *stop_after)
            if checkpoints is not None:
                checkpoints.step_done(snapshot, global_step, last_of_epoch=n >= steps)
        mean = epoch_loss / max(n, 1)
        metrics = {"train_loss": mean, "epoch_seconds": time.time() - t_epoch}
        if plain is not None:
            history["plain_loss"].append(plain_loss / max(n, 1))
            metrics["plain_train_loss"] = history["plain_loss"][-1]
        stats = reader.epoch_stats(epoch)
        log_input_stats(stats, cfg, log, epoch)
        metrics.update({f"input_{k}": v for k, v in stats.items() if k in INPUT_METRICS})
        tracker.log_metrics(metrics, step=epoch)
        log(f"epoch {epoch} done: mean loss {mean:.4f}"
            + (f" (plain network {history['plain_loss'][-1]:.4f})" if plain is not None else "")
            + f", {time.time() - t_epoch:.1f} s")
        _check_rise(history, mean, cfg.loss_rise_tolerance, epoch)
        history["loss"].append(mean)
        stop_early = bool(after_epoch(epoch)) if after_epoch is not None else False
        if checkpoints is not None:
            checkpoints.epoch_done(snapshot)
        if stop_after is not None:
            _stop(checkpoints, snapshot, comm, *stop_after)
        if stop_early:
            history["stopped_early_after_epoch"] = epoch
            break
    if signals is not None:
        signals.in_loop = False
    snap = comm.counters.snapshot()
    history["comm_per_step"] = {k: {"bytes": v["bytes"] / max(steps_here, 1),
                                    "calls": v["calls"] / max(steps_here, 1)} for k, v in snap.items()}
    history["input_wait_fraction"] = wait_s / max(wait_s + busy_s, 1e-9)
    history["steps"] = global_step
    history["step_log"] = step_log
    tracker.log_metrics({"input_wait_fraction": history["input_wait_fraction"]})
    return history


def _check_rise(history: dict, mean: float, tolerance: float, epoch: int) -> None:
    """Stop when an epoch's mean loss exceeds the previous epoch's, or the untrained model's first
    step, by more than ``tolerance`` (a fraction): training is then moving the wrong way."""
    checks = [(f"epoch {epoch - 1}", history["loss"][-1])] if history["loss"] else []
    if "first_step_loss" in history:
        checks.append(("the untrained model's first step", history["first_step_loss"]))
    for what, before in checks:
        if mean > before * (1.0 + tolerance) and mean - before > 1e-6:
            raise TrainingDiverged(
                f"the mean training loss of epoch {epoch} is {mean:.4g}, above {what} ({before:.4g}) "
                f"by more than --loss-rise-tolerance {tolerance:g}; the step is too large for this data: "
                f"lower --outer-lr or --inner-lr, set --clip-norm / --inner-clip, or raise the tolerance")


def all_epochs(reader, epochs: int, first_epoch: int = 0, skip: int = 0):
    """Every epoch's batches from ``first_epoch`` on as one prefetched stream, so the next
    epoch's reading (shuffle buffer fill, first stripes) overlaps the last steps of the current
    one. ``skip``: batches of ``first_epoch`` already trained (a resumed run): an epoch's batch
    order is a pure function of (seed, epoch, rank), so they are read and dropped, and the
    stream starts with the first batch the interrupted run had not trained."""
    if first_epoch >= epochs:
        return []
    ds = reader.dataset(epoch=first_epoch)
    if skip:
        ds = ds.skip(skip)
    for epoch in range(first_epoch + 1, epochs):
        ds = ds.concatenate(reader.dataset(epoch=epoch))
    return ds.prefetch(tf.data.AUTOTUNE)


INPUT_METRICS = ("tasks_read", "rows_read", "truncated_tasks", "support_rows_dropped", "query_rows_dropped",
                 "tasks_without_query", "padding_tasks")


def log_input_stats(stats: dict, cfg, log, epoch: int) -> None:
    """Say what padding and capping did to this epoch's data (rank 0's share)."""
    dropped_s, dropped_q = stats.get("support_rows_dropped", 0), stats.get("query_rows_dropped", 0)
    log(f"input (this worker, epoch {epoch}): {stats.get('tasks_read', 0):,} tasks, {stats.get('rows_read', 0):,} rows; "
        f"capped {stats.get('truncated_tasks', 0):,} tasks (dropped {dropped_s:,} support rows beyond "
        f"S={cfg.support_size} and {dropped_q:,} query rows beyond Q={cfg.query_size}); "
        f"{stats.get('tasks_without_query', 0):,} tasks had no query rows")


class StepWindow:
    """The steps since the last per-step log: mean global loss and real tasks per second (padding
    tasks and the tracing step excluded). Logged every ``log_every`` steps, and at least once per
    epoch (an epoch shorter than ``log_every`` still gets a point)."""

    def __init__(self, log_every: int, world_size: int):
        self.log_every, self.world_size = log_every, world_size
        self.losses, self.tasks, self.seconds = [], 0.0, 0.0
        self.logged_in_epoch = False

    def add(self, loss: float, tasks: float, seconds: float) -> None:
        self.losses.append(loss)
        if seconds > 0:
            self.tasks += tasks
            self.seconds += seconds

    def due(self, global_step: int, last_of_epoch: bool) -> bool:
        every = bool(self.log_every) and global_step % self.log_every == 0
        due = every or (last_of_epoch and not self.logged_in_epoch and bool(self.losses))
        self.logged_in_epoch = False if last_of_epoch else (self.logged_in_epoch or due)
        return due

    def take(self, global_step: int) -> dict:
        point = {"step": global_step, "loss": sum(self.losses) / len(self.losses),
                 "tasks_per_s": self.tasks / self.seconds if self.seconds > 0 else 0.0}
        self.losses, self.tasks, self.seconds = [], 0.0, 0.0
        return point


FAIL_AT_ENV = "GMETA_TEST_FAIL_AT"  # "STEP:RANK": that rank raises after that global step (tests)


def _injected_failure(rank: int):
    spec = os.environ.get(FAIL_AT_ENV, "")
    if not spec:
        return None
    step, _, at_rank = spec.partition(":")
    return int(step) if int(at_rank or 0) == rank else None


def _next_batch(batches, reader):
    """The next batch; a DataError met by the reader surfaces as itself (file, stripe, column),
    not as the tf.data error that carried it."""
    try:
        return next(batches)
    except tf.errors.OpError:
        error = getattr(reader, "error", None)
        if error is not None:
            raise error from None
        raise


def _stop(checkpoints, snapshot, comm, global_step: int, epoch: int, n: int, steps: int):
    """Every rank, after the same step: checkpoint, then raise ``Stopped``."""
    path = checkpoints.save(snapshot()) if checkpoints is not None and checkpoints.enabled else None
    signum = comm.stop.signal
    where = f"after global step {global_step} (epoch {epoch} step {n}/{steps})"
    saved = (f"checkpoint {path or checkpoints.latest()}; continue with --resume"
             if checkpoints is not None and checkpoints.enabled else "no checkpoint (--checkpoint-dir none)")
    who = signal_name(signum) if signum else "a stop request from another rank"
    raise Stopped(signum, f"stopped by {who} {where}: {saved}")
