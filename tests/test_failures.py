"""Failures end everything cleanly and say where: a pre-empted job (SIGTERM) checkpoints and
marks its MLflow run KILLED; an exception on one rank and `kill -9` of one worker end every rank
within 60 s with one message, and the run is marked FAILED. Real 2-worker horovodrun jobs."""

import os
import re
import signal
import subprocess
import time

import pytest
from conftest import BIN, REPO

from gmeta.trainer.checkpoint.files import committed_checkpoints, read_checkpoint_meta
from gmeta.trainer.parallel.launch import horovodrun_command

# many short epochs: the job is still training when the test acts on it
FLAGS = ["--model", "maml_dnn", "--epochs", "60", "--tasks-per-batch", "16", "--log-every", "0",
         "--no-saved-model", "--plain-baseline", "off", "--validation-split", "none", "--support-curve", "none",
         "--eval-splits", "user_cold"]


def _start(tmp_path, data, *extra, env=None):
    log_path = tmp_path / "job.log"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = horovodrun_command(2, [BIN / "gmeta", "train", "--data", data, "--tracking-uri", uri,
                                 "--output-dir", tmp_path / "runs", *FLAGS, *extra])
    full_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
                    OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(REPO),
                            start_new_session=True)
    return proc, log_path, uri, log


def _wait_for(proc, log_path, text, timeout=180):
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text():
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)


def _ends_within(proc, seconds, log_path) -> float:
    t0 = time.monotonic()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job was still running {seconds} s later:\n{log_path.read_text()[-3000:]}")
    return time.monotonic() - t0


def _workers(proc):
    import psutil

    out = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = p.environ()
            if "HOROVOD_RANK" in env and "train" in p.cmdline():
                out[int(env["HOROVOD_RANK"])] = p
        except psutil.Error:
            pass
    return out


def _only_run(uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("gmeta").experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_sigterm_stops_every_rank_after_one_step_with_a_checkpoint_and_a_killed_run(tiny_synth, tmp_path):
    proc, log_path, uri, log = _start(tmp_path, tiny_synth)
    with log:
        _wait_for(proc, log_path, "epoch 0 done")
        os.kill(proc.pid, signal.SIGTERM)  # what a scheduler does to the job's launcher
        _ends_within(proc, 60, log_path)
    text = log_path.read_text()
    assert proc.returncode != 0
    assert len(re.findall(r"Exit code: 143|exit with status code 143", text)) >= 1, text[-3000:]
    stopped = re.findall(r"\[gmeta rank 0\] STOPPED stopped by SIGTERM after global step (\d+) .*checkpoint (\S+);"
                         r" continue with --resume; MLflow run ([0-9a-f]{32}) marked KILLED", text)
    assert len(stopped) == 1, text[-3000:]
    step, path, run_id = stopped[0]
    assert "ERROR" not in text  # a stop, not a failure, on every rank
    # the checkpoint is committed, holds the stop step and was written by both ranks
    steps = [s for s, _ in committed_checkpoints(os.path.join(REPO, os.path.dirname(path)))]
    assert int(step) in steps
    _, meta = read_checkpoint_meta(os.path.join(REPO, path))
    assert meta["position"]["global_step"] == int(step) and meta["world_size"] == 2
    run = _only_run(uri)
    assert run.info.run_id == run_id and run.info.status == "KILLED"


@pytest.mark.slow  # fast tier: a failing rank's guard (test_foundation.py), bad data on one rank (test_bad_input.py)
def test_an_exception_on_one_rank_ends_every_rank_with_one_message(tiny_synth, tmp_path):
    proc, log_path, uri, log = _start(tmp_path, tiny_synth, "--checkpoint-dir", "none",
                                      env={"GMETA_FAULTS": "train_step:raise:3:1"})
    with log:
        _wait_for(proc, log_path, "injected failure")
        _ends_within(proc, 60, log_path)
    text = log_path.read_text()
    assert proc.returncode != 0
    assert text.count("[gmeta rank 1] ERROR RuntimeError: test hook GMETA_FAULTS: injected failure "
                      "after global step 3") == 1, text[-3000:]
    # rank 0 says why it stopped in one line, pointing at the failed rank's message
    for line in [line for line in text.splitlines() if "[gmeta rank 0] ERROR" in line]:
        assert "another rank failed or exited" in line, line
    assert _only_run(uri).info.status == "FAILED"


def test_kill_9_of_the_chief_ends_the_job_and_the_run_is_not_left_running(tiny_synth, tmp_path):
    proc, log_path, uri, log = _start(tmp_path, tiny_synth, "--checkpoint-dir", "none")
    with log:
        _wait_for(proc, log_path, "epoch 0 done")
        _workers(proc)[0].kill()
        _ends_within(proc, 60, log_path)
    text = log_path.read_text()
    assert proc.returncode != 0
    assert re.search(r"Process name: 0\s+Exit code: 137", text), text[-3000:]
    assert "[gmeta rank 1] ERROR a collective was aborted: another rank failed or exited" in text, text[-3000:]
    assert _only_run(uri).info.status == "FAILED"  # marked by the surviving rank


def test_a_slow_fault_sleeps_from_its_step_on_and_only_on_its_rank(monkeypatch):
    """``slow`` (what the elastic tests use to outlast a driver's reset): no sleep before its step,
    SLOW_SECONDS at it and at every later step, none on another rank; a bad action is named."""
    from gmeta.trainer.parallel import faults

    monkeypatch.setenv(faults.ENV, "train_step:slow:8:1")
    faults._planned.cache_clear()
    try:
        def took(step, rank):
            t0 = time.monotonic()
            faults.fault_point("train_step", step=step, rank=rank)
            return time.monotonic() - t0

        assert took(7, 1) < faults.SLOW_SECONDS / 2
        assert took(8, 1) >= faults.SLOW_SECONDS and took(11, 1) >= faults.SLOW_SECONDS
        assert took(11, 0) < faults.SLOW_SECONDS / 2
        t0 = time.monotonic()
        faults.fault_point("step_done", step=11, rank=1)  # another point: not this fault's
        assert time.monotonic() - t0 < faults.SLOW_SECONDS / 2
        assert faults.parse_faults("step_done:slow:3") == (faults.Fault("step_done", "slow", 3, None),)
        with pytest.raises(ValueError, match="ACTION one of raise, die, pause, slow"):
            faults.parse_faults("train_step:crawl:3")
    finally:
        faults._planned.cache_clear()
