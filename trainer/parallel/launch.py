"""Process-level safety for multi-worker jobs: a failing rank ends the whole job.

A rank that raises must not linger in Horovod's shutdown (it would wait on peers that are
themselves blocked in a collective). ``run_guarded`` prints the error with the rank, flushes,
and leaves with ``os._exit(1)``; horovodrun then sees a non-zero exit and terminates the other
workers, so the job ends with that message instead of hanging.

Also the one ``horovodrun`` command line every launcher builds (``horovodrun_command``), the
environment its workers get (``horovodrun_env``), the one test for running under it
(``launched_by_horovodrun``), and which host a rank is on (``worker_host``, ``check_visible``).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import traceback

from gmeta.trainer.parallel.signals import Stopped

ABORTED_EXIT_DELAY_S = 1.0

#: what horovodrun sets in every worker's environment (Gloo, Open MPI, MPICH), holding its rank
RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched_by_horovodrun() -> bool:
    """True when this process was started by horovodrun (Gloo or MPI)."""
    return any(k in os.environ for k in RANK_VARIABLES)


#: what horovodrun sets in every worker's environment: the number of workers on its host
LOCAL_SIZE_VARIABLES = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def worker_threads(environ, cores: int) -> dict:
    """TensorFlow's thread pools for a worker that shares its host with others (the variables to
    set; none where there is one worker, or where the user set either): each worker gets its
    share of the cores for an op's own threads and one thread to run ops side by side. TensorFlow
    alone gives every process all the cores twice over, so N workers on a host ask for 2N times
    the cores. Measured (2 cores, 2 workers, ``gmeta bench movielens``, two runs each): 1/1 threads
    2,137-2,492 tasks/s second order and 2,591-2,766 first order, against TensorFlow's 2/2
    1,562-1,973 and 2,013-2,042; one worker on 2 cores (``gmeta bench meta``) is fastest with
    TensorFlow's own (13.98 ms/step against 18.54 with 1/1), so it is left alone."""
    local = next((int(environ[k]) for k in LOCAL_SIZE_VARIABLES if str(environ.get(k, "")).isdigit()), 1)
    if local <= 1 or any(k in environ for k in THREAD_VARIABLES):
        return {}
    return {"TF_NUM_INTRAOP_THREADS": str(max(1, cores // local)), "TF_NUM_INTEROP_THREADS": "1"}


def worker_host() -> str:
    """The host this rank runs on, as the launch named it: horovodrun's ``-H`` name
    (``HOROVOD_HOSTNAME``, set in every Gloo worker), else the machine's host name. (Two hosts
    that share a kernel, such as network namespaces, report one ``socket.gethostname()``.)"""
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


def check_visible(flag: str, path: str, rank: int) -> None:
    """Under horovodrun, a local ``path`` this rank's host does not see is an error naming the
    host and the path (each rank checks its own; ``hdfs://`` and other URIs are not checked here)."""
    if not launched_by_horovodrun() or "://" in str(path) or os.path.exists(path):
        return
    raise FileNotFoundError(f"{flag} {path}: not found on host {worker_host()} (rank {rank}); every host must see it "
                            f"at the same path (a shared disk, NFS, or hdfs://)")


def horovodrun_command(workers: int, argv, hosts: str | None = None, *, network_interface: str | None = None,
                       ssh_port: int | None = None, ssh_identity_file: str | None = None) -> list:
    """``horovodrun -np N -H localhost:N --gloo ARGV`` as strings (``hosts`` replaces
    ``localhost:N``). The horovodrun beside this Python comes first, so a virtualenv launches its
    own Horovod whatever the PATH says. Across hosts: ``network_interface`` (horovodrun's
    ``--network-interface``: Gloo binds it on every host, and the driver advertises its address),
    ``ssh_port`` and ``ssh_identity_file`` (its ``-p`` and ``-i``)."""
    found = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    if not os.path.exists(found):
        found = shutil.which("horovodrun")
    if not found:
        raise FileNotFoundError(f"horovodrun not found beside {sys.executable} nor on PATH: install Horovod in "
                                "this environment (pip install horovod, built against TensorFlow) or build the "
                                "virtualenv with `make venv`")
    options = [*(["--network-interface", network_interface] if network_interface else []),
               *(["-p", str(ssh_port)] if ssh_port else []),
               *(["-i", str(ssh_identity_file)] if ssh_identity_file else [])]
    return [found, "-np", str(workers), "-H", hosts or f"localhost:{workers}", *options, "--gloo",
            *map(str, argv)]


def horovodrun_env(extra: dict | None = None, base: dict | None = None, one_thread: bool = False) -> dict:
    """The environment of a launched job: this Python's bin folder first on PATH (horovodrun
    starts workers by name), unbuffered output, no TensorFlow start-up chatter; ``one_thread``:
    one OpenMP thread per worker (benchmarks and tests, where workers share the cores) unless the
    caller's environment says otherwise; ``extra`` wins over all of it."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if one_thread:
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _rank_label() -> str:
    for key in RANK_VARIABLES:
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
    except Stopped as exc:  # a clean stop (SIGTERM/SIGINT): every rank exits 128 + signal
        if _rank_label() == "rank 0":
            sys.stderr.write(f"[gmeta rank 0] STOPPED {exc}\n")
        _hard_exit(exc.exit_code)
    except KeyboardInterrupt:
        _hard_exit(130)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job
        debug = os.environ.get("GMETA_DEBUG") == "1"
        detail = traceback.format_exc() if debug else one_line(exc)
        sys.stderr.write(f"[gmeta {_rank_label()}] ERROR {detail}\n")
        if not debug:
            sys.stderr.write(f"[gmeta {_rank_label()}] (set GMETA_DEBUG=1 for the traceback)\n")
        if collective_aborted(exc):
            # another rank failed first: let it be the first to exit, so that horovodrun names the
            # rank with the cause (both would otherwise exit within milliseconds, in either order)
            time.sleep(ABORTED_EXIT_DELAY_S)
        _hard_exit(1)
    return 1


def collective_aborted(exc: BaseException) -> bool:
    """A Horovod collective failed under this rank because a peer failed, exited or was
    killed: Horovod's shutdown message, or a TensorFlow error raised by a Horovod op."""
    text = str(exc)
    return "Horovod has been shut down" in text or (
        type(exc).__name__ in ("UnknownError", "InternalError", "AbortedError", "UnavailableError")
        and "Horovod" in text)


def one_line(exc: BaseException) -> str:
    """The error as gmeta reports it. TensorFlow's op errors carry the graph's construction
    traceback and Horovod's shutdown error a paragraph: of the first only its last line
    matters, of the second the fact that another rank failed first."""
    text = str(exc)
    if collective_aborted(exc):
        return ("a collective was aborted: another rank failed or exited (its own message comes first; "
                "horovodrun names it)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Graph execution error"):
        # the message is the last block before the "[[{{node ...}}]] [Op:...]" locator, after
        # the "Detected at node ... defined at" construction traceback
        told = [line for line in lines[1:] if not line.startswith(("[[", "File ", "Detected at node"))]
        text = told[-1] if told else lines[-1]
    return f"{type(exc).__name__}: {text}"


def _hard_exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
