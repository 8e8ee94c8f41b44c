"""Fault points: the one way tests make a run fail at a chosen place, step and rank.

Production code calls ``fault_point(name, step=..., rank=...)`` at the named points below; it
does nothing unless the environment variable ``GMETA_FAULTS`` is set (never in production). The
variable is read once, at the first fault point, and holds comma-separated faults::

    GMETA_FAULTS=POINT:ACTION:STEP[:RANK][,POINT:ACTION:STEP[:RANK]...]

POINT (where; STEP is the global step there):

    train_step          in ``fit``, right after a training step, before the loss guards, the
                        step's log line, the stop check and the step's checkpoint
    step_done           in ``fit``, at the end of a step: a checkpoint due at it is committed
    checkpoint_commit   in ``save_checkpoint``, once every rank's files of the checkpoint of
                        that step are on disk, before rank 0 writes meta.json and COMMITTED

ACTION (what the rank does there):

    raise   a RuntimeError, which fails the run like any exception
    die     ``os._exit(3)``: the process vanishes with nothing cleaned up (a kill mid-write)
    pause   sleep until killed (a test then kills the job at a known point)
    slow    from that step on, sleep ``SLOW_SECONDS`` at the point on every step (a run that must
            outlast something outside it, an elastic driver taking a host back, however fast
            its steps are)

RANK: the rank that acts; every rank when left out. Examples: ``train_step:raise:3:1`` (rank 1
raises after global step 3), ``checkpoint_commit:die:20`` (every rank exits while committing the
checkpoint of step 20), ``step_done:pause:42``. A malformed value is an error naming what is valid.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass

ENV = "GMETA_FAULTS"
#: point -> where it is, as the messages say it (``{step}``: the global step)
POINTS = {
    "train_step": "after global step {step}",
    "step_done": "after step {step}",
    "checkpoint_commit": "inside checkpoint ckpt-{step:09d}",  # the checkpoint's directory name
}
ACTIONS = ("raise", "die", "pause", "slow")
DIE_EXIT_CODE = 3
#: what a ``slow`` fault sleeps at each of its steps
SLOW_SECONDS = 0.25


@dataclass(frozen=True)
class Fault:
    point: str
    action: str
    step: int
    rank: int | None  # None: every rank


def parse_faults(spec: str) -> tuple:
    """The faults of a ``GMETA_FAULTS`` value (see the module docstring)."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        try:
            if len(parts) not in (3, 4) or parts[0] not in POINTS or parts[1] not in ACTIONS:
                raise ValueError
            faults.append(Fault(parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else None))
        except ValueError:
            raise ValueError(f"{ENV}: {item!r} is not POINT:ACTION:STEP[:RANK] with POINT one of "
                             f"{', '.join(POINTS)} and ACTION one of {', '.join(ACTIONS)}") from None
    return tuple(faults)


@functools.lru_cache(maxsize=1)
def _planned() -> tuple:
    return parse_faults(os.environ.get(ENV, ""))


def fault_point(name: str, *, step: int, rank: int) -> None:
    """Act on every fault planned for this point, step and rank (none: returns at once)."""
    for fault in _planned():
        if fault.point != name or fault.rank not in (None, rank):
            continue
        if fault.step == step:
            _act(fault.action, POINTS[name].format(step=step))
        elif fault.action == "slow" and step > fault.step:
            time.sleep(SLOW_SECONDS)


def _act(action: str, where: str) -> None:
    if action == "slow":
        sys.stderr.write(f"[gmeta] test hook {ENV}: {SLOW_SECONDS:g} s more per step from {where} on\n")
        time.sleep(SLOW_SECONDS)
        return
    if action == "raise":
        raise RuntimeError(f"test hook {ENV}: injected failure {where}")
    sys.stderr.write(f"[gmeta] test hook {ENV}: {'exiting' if action == 'die' else 'pausing'} {where}\n")
    sys.stderr.flush()
    if action == "die":
        os._exit(DIE_EXIT_CODE)
    while True:
        time.sleep(1)
