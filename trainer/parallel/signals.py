"""Stopping a job cleanly when a scheduler or a user asks (SIGTERM, SIGINT).

A pre-empted job should leave a checkpoint to resume from and an MLflow run marked KILLED, and
every rank must stop at the same step (a rank that leaves early strands the others in a
collective). So during training the signal is only noted: the training loop raises the rank's
``comm.StopRequest``, which rides in the next step's allreduce, and after that step every rank
saves the checkpoint and raises ``Stopped`` together. Outside the training loop (evaluation,
export) there is no step to finish, and the signal raises ``Stopped`` at once.

A rank can also be stuck where Python never runs (blocked in a collective whose peer died), so
a watcher thread, woken through ``signal.set_wakeup_fd`` even then, gives the rank ``grace_s``
seconds; past that it calls ``on_deadline`` (the chief marks its MLflow run KILLED) and exits.
horovodrun sends SIGTERM to every worker when the job is stopped or one worker fails, and
SIGKILL 5 s later; the default grace (4 s) fits inside that.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The job was asked to stop; ``signum`` is the signal (this rank's, or the one that reached
    another rank), ``exit_code`` the conventional 128 + signal."""

    def __init__(self, signum: int | None, message: str):
        self.signum = signum or signal.SIGTERM
        self.exit_code = 128 + int(self.signum)
        super().__init__(message)


def signal_name(signum) -> str:
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return f"signal {signum}"


class StopSignals:
    """Install with ``with StopSignals(stop_request, ...):`` around a run (main thread only;
    elsewhere it does nothing). ``in_loop`` is set by the training loop while it steps."""

    def __init__(self, stop_request, grace_s: float = 4.0, on_deadline=None, rank_label: str = "rank 0"):
        self.stop_request = stop_request
        self.grace_s = grace_s
        self.on_deadline = on_deadline
        self.rank_label = rank_label
        self.in_loop = False
        self.stopping = False  # a Stopped is on its way: later signals change nothing
        self._previous = {}
        self._pipe = None
        self._old_wakeup = -1

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), name="gmeta-stop-watcher", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if not self._previous:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        os.close(self._pipe[1])  # the watcher sees end-of-file and ends

    # ---- main thread ----
    def _handler(self, signum, _frame) -> None:
        self.stop_request.note(signum)
        if not self.in_loop and not self.stopping:
            self.stopping = True
            raise Stopped(signum, f"{signal_name(signum)} outside the training loop; no checkpoint written "
                                  f"(the last one is that of the last epoch or step it saved)")

    # ---- watcher thread ----
    def _watch(self, read_fd: int) -> None:
        while True:  # (the wakeup fd also carries other signals that have Python handlers)
            try:
                data = os.read(read_fd, 1)
            except OSError:
                return
            if not data:  # the run ended without a stop signal
                os.close(read_fd)
                return
            if data[0] in SIGNALS:
                break
        signum = data[0]
        # the main thread stops the run itself unless it is blocked (see the module docstring)
        time.sleep(self.grace_s)
        try:
            if self.on_deadline is not None:
                self.on_deadline(signum)
        finally:
            sys.stderr.write(f"[gmeta {self.rank_label}] {signal_name(signum)}: the rank did not stop within "
                             f"{self.grace_s:g} s (blocked in a collective?); exiting\n")
            sys.stderr.flush()
            os._exit(128 + signum)
