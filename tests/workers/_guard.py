"""Shared by the test workers: run a worker's body under the trainer's failure guard.

A worker that raises on one rank while the others wait in a collective must end the whole
horovodrun job at once (with the rank's message), exactly as ``gmeta train`` does, instead of
hanging until the pytest timeout. ``guard(main, *args)`` runs ``main`` under
``gmeta.trainer.parallel.launch.run_guarded`` and exits with its status. Every multi-worker test worker
calls it as its last top-level statement (tests/test_foundation.py checks that).
"""
import sys

from gmeta.trainer.parallel.launch import run_guarded


def guard(main, *args) -> None:
    sys.exit(run_guarded(main, *args))
