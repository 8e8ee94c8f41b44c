"""The training loop: epochs of meta-steps with progress, guards and input-wait accounting.

The plain network (``--plain-baseline alongside``) steps on the same batches right after the
model, so both see identical data; its collectives are counted on a communicator of its own so
the reported communication per step is the model's alone. Every rank sees the same (global)
loss, so the guards stop every rank at the same step, with the same message. Checkpoints
(``gmeta.trainer.checkpoint.run_checkpoints``) are taken between steps and at every epoch end, on every
rank at the same step; a resumed run starts at the first batch the interrupted one had not trained
(``EpochState``). ``StepClock`` times the steps and makes the per-step log points.
"""

from __future__ import annotations

import math
import time

import tensorflow as tf

from gmeta.trainer.meta.learner import batch_spec
from gmeta.trainer.parallel.faults import fault_point
from gmeta.trainer.parallel.signals import Stopped, signal_name
from gmeta.trainer.run.ahead import BatchesAhead
from gmeta.trainer.run.epoch_state import EpochState
from gmeta.trainer.run.step_clock import StepClock


class TrainingDiverged(RuntimeError):
    """The loss went NaN/inf or rose past the tolerance; the message says what to change."""


def fit(learner, reader, cfg, comm, log, tracker, plain=None, after_epoch=None, checkpoints=None,
        signals=None) -> dict:
    """Train ``cfg.epochs`` epochs; ``after_epoch(epoch)`` runs on every rank after each epoch
    (validation; it may raise to stop, e.g. a pruned tuning trial, or return True to end training
    after this epoch, early stopping: it decides from the same report on every rank).

    ``checkpoints`` (``gmeta.trainer.checkpoint.run_checkpoints.RunCheckpoints``): its
    ``resume_point`` (when the run resumes) gives the position, the loss history and the
    interrupted epoch's running sums, so the run continues with the first batch not yet trained
    and the guards see the same history; ``step_done`` / ``epoch_done`` save checkpoints of that
    same state (``EpochState.snapshot``).
    """
    comm.counters.reset()
    state = EpochState(reader.steps_per_epoch, plain is not None,
                       checkpoints.resume_point if checkpoints is not None else None)
    history = state.history
    batches = BatchesAhead(all_epochs(reader, cfg.epochs, state.first_epoch, state.first_step, packed=True))
    clock = StepClock(cfg.log_every, comm.size)
    step_fn = plain_fn = None
    stop_requested = False
    if signals is not None:
        signals.in_loop = True
    try:
        for epoch in range(state.first_epoch, cfg.epochs):
            state.begin_epoch(epoch)
            t_epoch = time.time()
            while not state.epoch_done:
                clock.ask()
                batch = _next_batch(batches, reader)
                clock.arrived(first_of_epoch=state.n == 0)
                if step_fn is None:
                    step_fn = unpacking(learner.compiled_train_step, reader.unpack, batch)
                    plain_fn = unpacking(plain.compiled_train_step, reader.unpack, batch) if plain is not None else None
                comm.stop.arm()
                out = step_fn(batch)
                loss = float(out["loss"])
                clock.stepped()
                plain_loss = float(plain_fn(batch)["loss"]) if plain_fn is not None else None
                state.global_step += 1
                fault_point("train_step", step=state.global_step, rank=comm.rank)
                _check_finite(loss, epoch, state.n)
                state.add_step(loss, plain_loss)
                point = clock.point(loss, float(out["tasks"]), state.global_step, last_of_epoch=state.epoch_done)
                if point is not None:
                    _log_step(point, epoch, state, cfg, comm, log, tracker)
                if float(out["stop"]) > 0:
                    stop_requested = True
                    if not state.epoch_done:  # (at an epoch's last step, the epoch's end is recorded first)
                        _stop(checkpoints, state, comm)
                if checkpoints is not None:
                    checkpoints.step_done(state.snapshot, state.global_step, last_of_epoch=state.epoch_done)
                fault_point("step_done", step=state.global_step, rank=comm.rank)
            mean, plain_mean = state.epoch_means()
            if plain_mean is not None:
                history["plain_loss"].append(plain_mean)
            _log_epoch(epoch, mean, plain_mean, t_epoch, reader, cfg, log, tracker)
            _check_rise(history, mean, cfg.loss_rise_tolerance, epoch)
            history["loss"].append(mean)
            stop_early = bool(after_epoch(epoch)) if after_epoch is not None else False
            if checkpoints is not None:
                checkpoints.epoch_done(state.snapshot)
            if stop_requested:
                _stop(checkpoints, state, comm)
            if stop_early:
                history["stopped_early_after_epoch"] = epoch
                break
    finally:
        batches.close()
    if signals is not None:
        signals.in_loop = False
    snap = comm.counters.snapshot()
    history["comm_per_step"] = {k: {"bytes": v["bytes"] / max(clock.steps, 1),
                                    "calls": v["calls"] / max(clock.steps, 1)} for k, v in snap.items()}
    history["input_wait_fraction"] = clock.input_wait_fraction
    history["input_wait"] = clock.input_wait()
    history["steps"] = state.global_step
    history["step_log"] = clock.step_log
    tracker.log_metrics({"input_wait_fraction": history["input_wait_fraction"]})
    return history


def _check_finite(loss: float, epoch: int, n: int) -> None:
    """Stop at the first NaN/inf loss (``n``: the steps of the epoch before this one)."""
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"the training loss became {loss} at epoch {epoch} step {n + 1}; lower --outer-lr "
            f"or --inner-lr, or set --clip-norm / --inner-clip")


def _log_step(point: dict, epoch: int, state, cfg, comm, log, tracker) -> None:
    tracker.log_metrics({"step_loss": point["loss"], "tasks_per_s": point["tasks_per_s"]},
                        step=state.global_step, synchronous=False)
    if cfg.log_every:
        log(f"epoch {epoch} step {state.n}/{state.steps} loss {point['loss']:.4f} "
            f"({point['tasks_per_s']:,.0f} real tasks/s over {comm.size} worker(s))")


def _log_epoch(epoch: int, mean: float, plain_mean, t_epoch: float, reader, cfg, log, tracker) -> None:
    """The epoch's metrics (mean losses, time, what the input did) and its line."""
    metrics = {"train_loss": mean, "epoch_seconds": time.time() - t_epoch}
    if plain_mean is not None:
        metrics["plain_train_loss"] = plain_mean
    stats = reader.epoch_stats(epoch)
    log_input_stats(stats, cfg, log, epoch)
    metrics.update({f"input_{k}": v for k, v in stats.items() if k in INPUT_METRICS})
    tracker.log_metrics(metrics, step=epoch)
    log(f"epoch {epoch} done: mean loss {mean:.4f}"
        + (f" (plain network {plain_mean:.4f})" if plain_mean is not None else "")
        + f", {time.time() - t_epoch:.1f} s")


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


def unpacking(compiled_step, unpack, packed_batch):
    """The traced step of packed batches: ``unpack`` (slices) then the learner's own traced step
    (``compiled_step(spec)``), so the batch enters the graph as the reader's few packed tensors."""
    step = compiled_step(batch_spec(unpack(packed_batch)))
    return tf.function(lambda packed: step(unpack(packed)), input_signature=[batch_spec(packed_batch)],
                       autograph=False)


def all_epochs(reader, epochs: int, first_epoch: int = 0, skip: int = 0, packed: bool = False):
    """Every epoch's batches from ``first_epoch`` on as one prefetched stream, so the next
    epoch's reading (shuffle buffer fill, first stripes) overlaps the last steps of the current
    one. ``skip``: batches of ``first_epoch`` already trained (a resumed run): an epoch's batch
    order is a pure function of (seed, epoch, rank), so they are read and dropped, and the
    stream starts with the first batch the interrupted run had not trained."""
    if first_epoch >= epochs:
        return []
    ds = reader.dataset(epoch=first_epoch, packed=packed, epochs=epochs - first_epoch)
    if skip:
        ds = ds.skip(skip)
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


def _stop(checkpoints, state, comm):
    """Every rank, after the same step: checkpoint, then raise ``Stopped``."""
    path = checkpoints.save(state.snapshot()) if checkpoints is not None and checkpoints.enabled else None
    signum = comm.stop.signal
    where = f"after global step {state.global_step} (epoch {state.epoch} step {state.n}/{state.steps})"
    saved = (f"checkpoint {path or checkpoints.latest()}; continue with --resume"
             if checkpoints is not None and checkpoints.enabled else "no checkpoint (--checkpoint-dir none)")
    who = signal_name(signum) if signum else "a stop request from another rank"
    raise Stopped(signum, f"stopped by {who} {where}: {saved}")
