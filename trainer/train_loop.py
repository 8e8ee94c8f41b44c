"""The training loop: epochs of meta-steps with progress, guards and input-wait accounting.

The plain network (``--plain-baseline alongside``) steps on the same batches right after the
model, so both see identical data; its collectives are counted on a communicator of its own so
the reported communication per step is the model's alone. Every rank sees the same (global)
loss, so the guards stop every rank at the same step, with the same message. Checkpoints
(``gmeta.trainer.checkpoint``) are taken between steps and at every epoch end, on every rank at
the same step; a resumed run starts at the first batch the interrupted one had not trained.
"""

from __future__ import annotations

import math
import time


class TrainingDiverged(RuntimeError):
    """The loss went NaN/inf or rose past the tolerance; the message says what to change."""


def fit(learner, reader, cfg, comm, log, tracker, plain=None, after_epoch=None, checkpoints=None) -> dict:
    """Train ``cfg.epochs`` epochs; ``after_epoch(epoch)`` runs on every rank after each epoch
    (validation; it may raise to stop, e.g. a pruned tuning trial).

    ``checkpoints`` (``gmeta.trainer.checkpoint.RunCheckpoints``): its ``resume_point`` (when the
    run resumes) gives the position, the loss history and the interrupted epoch's running sums,
    so the run continues with the first batch not yet trained and the guards see the same
    history; ``step_done`` / ``epoch_done`` save checkpoints of that same state.
    """
    from gmeta.trainer.meta_learner import batch_spec

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
    for epoch in range(first_epoch, cfg.epochs):
        if epoch == first_epoch and first_step:
            epoch_loss, plain_loss, n = sums["loss"], sums["plain_loss"], first_step
        else:
            epoch_loss, plain_loss, n = 0.0, 0.0, 0
        t_epoch, n_here = time.time(), 0

        def snapshot(epoch=epoch):
            done = n >= steps
            return {"position": {"epoch": epoch + 1 if done else epoch, "step_in_epoch": 0 if done else n,
                                 "global_step": global_step, "steps_per_epoch": steps},
                    "history": history,
                    "epoch_sums": {"loss": 0.0 if done else epoch_loss, "plain_loss": 0.0 if done else plain_loss}}

        while n < steps:
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            if step_fn is None:
                step_fn = learner.compiled_train_step(batch_spec(batch))
                plain_fn = plain.compiled_train_step(batch_spec(batch)) if plain is not None else None
            loss = float(step_fn(batch))
            t2 = time.perf_counter()
            if plain_fn is not None:
                plain_loss += float(plain_fn(batch))
            if steps_here > 0:  # the first step includes tracing
                wait_s += t1 - t0
                busy_s += t2 - t1
            global_step += 1
            steps_here += 1
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"the training loss became {loss} at epoch {epoch} step {n + 1}; lower --outer-lr "
                    f"or --inner-lr, or set --clip-norm / --inner-clip")
            if global_step == 1:
                history["first_step_loss"] = loss  # the untrained model's loss: a reference
            epoch_loss += loss
            n += 1
            n_here += 1
            if cfg.log_every and global_step % cfg.log_every == 0:
                tasks_s = cfg.tasks_per_batch * comm.size * n_here / max(time.time() - t_epoch, 1e-9)
                log(f"epoch {epoch} step {n}/{steps} loss {loss:.4f} "
                    f"({tasks_s:,.0f} tasks/s over {comm.size} worker(s))")
            if checkpoints is not None:
                checkpoints.step_done(snapshot, global_step, last_of_epoch=n >= steps)
        mean = epoch_loss / max(n, 1)
        metrics = {"train_loss": mean, "epoch_seconds": time.time() - t_epoch}
        if plain is not None:
            history["plain_loss"].append(plain_loss / max(n, 1))
            metrics["plain_train_loss"] = history["plain_loss"][-1]
        if epoch == 0:
            log_input_stats(reader.stats, cfg, log)
        tracker.log_metrics(metrics, step=epoch)
        log(f"epoch {epoch} done: mean loss {mean:.4f}"
            + (f" (plain network {history['plain_loss'][-1]:.4f})" if plain is not None else "")
            + f", {time.time() - t_epoch:.1f} s")
        _check_rise(history, mean, cfg.loss_rise_tolerance, epoch)
        history["loss"].append(mean)
        if after_epoch is not None:
            after_epoch(epoch)
        if checkpoints is not None:
            checkpoints.epoch_done(snapshot)
    snap = comm.counters.snapshot()
    history["comm_per_step"] = {k: {"bytes": v["bytes"] / max(steps_here, 1),
                                    "calls": v["calls"] / max(steps_here, 1)} for k, v in snap.items()}
    history["input_wait_fraction"] = wait_s / max(wait_s + busy_s, 1e-9)
    history["steps"] = global_step
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
    import tensorflow as tf

    if first_epoch >= epochs:
        return []
    ds = reader.dataset(epoch=first_epoch)
    if skip:
        ds = ds.skip(skip)
    for epoch in range(first_epoch + 1, epochs):
        ds = ds.concatenate(reader.dataset(epoch=epoch))
    return ds.prefetch(tf.data.AUTOTUNE)


def log_input_stats(stats: dict, cfg, log) -> None:
    """Say what padding and capping did to the data (rank 0's share), once."""
    dropped_s, dropped_q = stats.get("support_rows_dropped", 0), stats.get("query_rows_dropped", 0)
    log(f"input (this worker, epoch 0): {stats.get('tasks_read', 0):,} tasks, {stats.get('rows_read', 0):,} rows; "
        f"capped {stats.get('truncated_tasks', 0):,} tasks (dropped {dropped_s:,} support rows beyond "
        f"S={cfg.support_size} and {dropped_q:,} query rows beyond Q={cfg.query_size}); "
        f"{stats.get('tasks_without_query', 0):,} tasks had no query rows")
