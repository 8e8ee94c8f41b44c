"""Process-level safety for multi-worker jobs: a failing rank ends the whole job.

A rank that raises must not linger in Horovod's shutdown (it would wait on peers that are
themselves blocked in a collective). ``run_guarded`` prints the error with the rank, flushes,
and leaves with ``os._exit(1)``; horovodrun then sees a non-zero exit and terminates the other
workers, so the job ends with that message instead of hanging.
"""

from __future__ import annotations

import os
import sys
import traceback


def _rank_label() -> str:
    for key in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if key in os.environ:
            return f"rank {os.environ[key]}"
    return "rank 0"


def run_guarded(body, *args, **kwargs) -> int:
    """Run ``body``; on any exception report it as ``[gmeta rank R] ERROR ...`` and hard-exit 1."""
    try:
        return int(body(*args, **kwargs) or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0:
            _hard_exit(code)
        return 0
    except KeyboardInterrupt:
        _hard_exit(130)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job
        debug = os.environ.get("GMETA_DEBUG") == "1"
        detail = traceback.format_exc() if debug else f"{type(exc).__name__}: {exc}"
        sys.stderr.write(f"[gmeta {_rank_label()}] ERROR {detail}\n")
        if not debug:
            sys.stderr.write(f"[gmeta {_rank_label()}] (set GMETA_DEBUG=1 for the traceback)\n")
        _hard_exit(1)
    return 1


def _hard_exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
