"""Step timing: how long steps wait for input, and the per-step log points.

Each step is timed in three marks: before the batch is asked for, when it arrives, and when
the step's loss is known. Waiting is the first interval, busy the second; the first step this
process runs is left out of both (it traces the step function). The waits also go into a
histogram (``WAIT_BINS_MS``), with the first step of each epoch counted apart, so a wait share
says what it is made of: a little on every step (the hand-off itself), or a few long waits (a
reader that fell behind, an epoch's shuffle buffer filling). The ``StepWindow`` turns the steps
since the last point into one log point (mean loss, real tasks per second).
"""

from __future__ import annotations

import bisect
import time

#: upper edges (ms) of the wait histogram's bins; the last bin is everything above
WAIT_BINS_MS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)


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


class StepClock:
    """Input-wait and busy time over this process's steps, and the per-step log points
    (``step_log``; not in checkpoints: timings differ between a run and its resumption)."""

    def __init__(self, log_every: int, world_size: int):
        self.window = StepWindow(log_every, world_size)
        self.step_log = []
        self.wait_s, self.busy_s = 0.0, 0.0
        self.steps = 0  # steps this process ran (the first one traces)
        self._asked = self._arrived = self._seconds = 0.0
        self._first_of_epoch = False
        self.wait_counts = [0] * (len(WAIT_BINS_MS) + 1)
        self.wait_sums = [0.0] * (len(WAIT_BINS_MS) + 1)
        self.epoch_start_wait_s, self.epoch_starts = 0.0, 0

    def ask(self) -> None:
        """Before asking for the next batch."""
        self._asked = time.perf_counter()

    def arrived(self, first_of_epoch: bool = False) -> None:
        """The batch is here: the step starts (``first_of_epoch``: an epoch's first batch)."""
        self._arrived = time.perf_counter()
        self._first_of_epoch = first_of_epoch

    def stepped(self) -> None:
        """The step's loss is known."""
        done = time.perf_counter()
        traced = self.steps == 0  # the first step includes tracing
        if not traced:
            wait = self._arrived - self._asked
            self.wait_s += wait
            self.busy_s += done - self._arrived
            if self._first_of_epoch:
                self.epoch_start_wait_s += wait
                self.epoch_starts += 1
            else:
                k = bisect.bisect_left(WAIT_BINS_MS, wait * 1e3)
                self.wait_counts[k] += 1
                self.wait_sums[k] += wait
        self._seconds = 0.0 if traced else done - self._asked
        self.steps += 1

    def point(self, loss: float, tasks: float, global_step: int, last_of_epoch: bool) -> dict | None:
        """Add the step to the window; the log point when one is due, else None."""
        self.window.add(loss, tasks, self._seconds)
        if not self.window.due(global_step, last_of_epoch=last_of_epoch):
            return None
        point = self.window.take(global_step)
        self.step_log.append(point)
        return point

    @property
    def input_wait_fraction(self) -> float:
        return self.wait_s / max(self.wait_s + self.busy_s, 1e-9)

    def input_wait(self) -> dict:
        """What the wait share is made of: the epochs' first steps apart, and a histogram of the
        other steps' waits (bin upper edge in ms -> steps, and their share of all step time)."""
        total = max(self.wait_s + self.busy_s, 1e-9)
        edges = [f"<={e:g}ms" for e in WAIT_BINS_MS] + [f">{WAIT_BINS_MS[-1]:g}ms"]
        return {"fraction": self.input_wait_fraction, "steps": sum(self.wait_counts) + self.epoch_starts,
                "epoch_starts": {"steps": self.epoch_starts, "share_of_step_time": self.epoch_start_wait_s / total},
                "histogram": {e: {"steps": c, "share_of_step_time": w / total}
                              for e, c, w in zip(edges, self.wait_counts, self.wait_sums) if c},
                "mean_ms_other_steps": 1e3 * sum(self.wait_sums) / max(sum(self.wait_counts), 1)}
