"""Shared test helpers: launching real ``horovodrun`` jobs on localhost with Gloo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gmeta.trainer.parallel.launch import horovodrun_command

# The test machine has 2 cores, shared by two pytest workers and the TensorFlow processes each
# test starts (horovodrun workers, gmeta commands). TensorFlow sizes its pools to the machine
# and its idle threads spin, so every process gets one intra-op thread (set before TensorFlow
# is imported here; inherited by every process a test starts). A user's own setting wins.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
BIN = Path(sys.executable).parent


def horovodrun(np_: int, argv, timeout: float = 180, env=None, check=True):
    """Run ``horovodrun -np N -H localhost:N --gloo <argv>``; return the CompletedProcess.

    ``argv`` is a list; a first element ending in ``.py`` that names a file in tests/workers is
    run with this interpreter. Output is captured; on failure (when ``check``) it is shown.
    """
    argv = [str(a) for a in argv]
    if argv and argv[0].endswith(".py") and not os.path.isabs(argv[0]):
        argv = [sys.executable, str(WORKERS / argv[0])] + argv[1:]
    cmd = horovodrun_command(np_, argv)
    full_env = dict(os.environ)
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"horovodrun -np {np_} failed with {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_rank_results(directory, np_: int):
    """Load ``rank{r}.json`` written by every worker; fail clearly if one is missing."""
    out = []
    for r in range(np_):
        p = Path(directory) / f"rank{r}.json"
        assert p.exists(), f"rank {r} wrote no result file {p}"
        out.append(json.loads(p.read_text()))
    return out


@pytest.fixture
def hvdrun():
    return horovodrun


def run_gmeta(*argv, cwd, timeout=600, check=True, env=None):
    """Run the installed ``gmeta`` command; on failure (when ``check``) show its output."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    if env:
        full_env.update(env)
    proc = subprocess.run([str(BIN / "gmeta"), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd), env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"gmeta {' '.join(map(str, argv))} failed ({proc.returncode})\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def last_json(proc) -> dict:
    """The JSON object a gmeta command prints as its last line (horovodrun's rank prefix removed)."""
    line = proc.stdout.strip().splitlines()[-1]
    return json.loads(re.sub(r"^\[\d+\]<stdout>:", "", line))


def train_report(proc) -> dict:
    """The full report of a ``gmeta train`` run: the file its last stdout line names."""
    return json.loads(Path(last_json(proc)["report"]).read_text())


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A small synthetic dataset for plumbing tests (not for learning claims)."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    run_gmeta("datagen", "--out", out, "--seed", "1", "--train-users", "300", "--cold-users", "60",
              "--items", "200", "--cold-items", "50", "--quiet", cwd=REPO)
    return out


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a slow end-to-end check whose behaviour the fast tier also covers more cheaply; "
                   "`make test` skips it (CI's 8-minute budget), `make test-slow` runs only these")


# The files whose tests take longest (measured: --durations), heaviest first. pytest-xdist's
# loadfile scheduler hands out files by their number of tests, so these few-but-long files came
# last and one worker ran them alone for minutes at the end; started first, the many short files
# fill the other worker meanwhile. Files not listed keep xdist's order, after these.
HEAVY_FILES_FIRST = ("test_daily_loop.py", "test_mlflow.py", "test_distributed.py", "test_serving.py",
                     "test_cluster.py", "test_checkpoint.py", "test_embedding_dist.py", "test_warm_start.py",
                     "test_failures.py", "test_foundation.py", "test_train_e2e.py", "test_compare.py", "test_tune.py",
                     "test_promote.py", "test_bad_input.py", "test_phases.py", "test_elastic.py")


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    def weight(scope: str) -> int:
        name = scope.rsplit("/", 1)[-1]
        return HEAVY_FILES_FIRST.index(name) if name in HEAVY_FILES_FIRST else len(HEAVY_FILES_FIRST)

    class HeavyFilesFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            if not getattr(self, "_heavy_first", False):
                self._heavy_first = True
                ordered = sorted(self.workqueue.items(), key=lambda item: weight(item[0]))  # stable
                self.workqueue.clear()
                self.workqueue.update(ordered)
            super()._assign_work_unit(node)

    return HeavyFilesFirst(config, log)


# the sub-configs of the loop tests (also imported by the horovodrun workers)
from workers._configs import LOOP_TEST_SETTINGS, part_configs  # noqa: E402,F401
