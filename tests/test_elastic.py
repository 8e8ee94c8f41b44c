"""Elastic training (horovodrun --min-np/--max-np/--host-discovery-script): a worker or a whole
host lost mid-run, the job going on without it from the last commit, re-sharded, and the host
taken in again when the discovery script lists it again. Real horovodrun, real Gloo, real kills.

The fast test runs two "hosts" that are this machine under two names (``localhost`` and
``127.0.0.1``: Horovod's elastic driver tells hosts apart by name and blacklists the host of a
failed worker, so one host with two slots would end the job); the slow one runs three
network-namespace hosts with sshd (gmeta.tools.cluster) and kills every gmeta process of one."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, last_json, run_gmeta

from gmeta.tools.cluster import netns
from gmeta.tools.cluster.cluster import Cluster, unavailable
from gmeta.trainer.checkpoint.files import committed_checkpoints

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
TRAIN = ["--model", "melu", "--input-sharding", "replicated", "--seed", "0", "--log-every", "0", "--no-saved-model",
         "--validation-split", "none", "--support-curve", "none", "--plain-baseline", "off", "--eval-splits",
         "user_cold", "--tracking-uri", "none", "--checkpoint-every-steps", "2", "--keep-checkpoints", "0"]


def _discovery(tmp_path, hosts) -> tuple:
    """A host discovery script that prints the hosts file (the test edits the file)."""
    listing = tmp_path / "hosts"
    listing.write_text("".join(f"{h}:1\n" for h in hosts))
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {listing}\n")
    script.chmod(0o755)
    return script, listing


def _elastic(np_, min_np, script, nic, argv, options=()) -> list:
    return [BIN / "horovodrun", "-np", str(np_), "--min-np", str(min_np), "--max-np", str(np_),
            "--host-discovery-script", script, "--network-interface", nic, *options,
            "--blacklist-cooldown-range", "1", "1",  # a failed host may come back 1 s later
            "--gloo", BIN / "gmeta", "train", *map(str, argv)]


def _table(ckpt: Path, name: str, what: str = "table") -> np.ndarray:
    """A whole table (or its row-optimizer slot ``what``) assembled from a checkpoint's shards."""
    parts = {}
    for shard in sorted(ckpt.glob("shard-*.npz")):
        with np.load(shard, allow_pickle=False) as z:
            key = f"model/table/{name}" + ("" if what == "table" else f"/{what}")
            for r, row in zip(z[f"model/@rows/{name}"], z[key]):
                parts[int(r)] = row
    return np.stack([parts[r] for r in range(len(parts))])


def _check_no_row_lost(run_dir: Path, before_loss: int) -> int:
    """Every row of every table is in the export; every row training had changed by the commit
    ``before_loss`` (the last one the lost worker wrote its shard of) is still trained in the end,
    not back at its initial value; the row optimizer's accumulators never went back. Returns
    how many trained rows were checked."""
    ckpts = run_dir / "checkpoints"
    steps = dict(committed_checkpoints(str(ckpts)))
    first, mid, last = Path(steps[0]), Path(steps[before_loss]), Path(steps[max(steps)])
    with np.load(run_dir / "model" / "embeddings.npz", allow_pickle=False) as z:
        export = {k: z[k] for k in z.files}
    checked = 0
    for name, final in export.items():
        init, trained = _table(first, name), _table(mid, name)
        assert final.shape == init.shape, (name, final.shape, init.shape)
        changed = np.any(trained != init, axis=1)
        assert np.all(np.any(final[changed] != init[changed], axis=1)), f"{name}: trained rows back at init"
        acc_mid, acc_last = _table(mid, name, "accumulator"), _table(last, name, "accumulator")
        assert np.all(acc_last >= acc_mid - 1e-6), f"{name}: row-optimizer slots went back"
        checked += int(changed.sum())
    return checked


def _wait_for(path: Path, pattern: str, proc, deadline: float) -> re.Match:
    while True:
        m = re.search(pattern, path.read_text())
        if m:
            return m
        assert proc.poll() is None and time.monotonic() < deadline, (pattern, path.read_text()[-4000:])
        time.sleep(0.1)


@pytest.mark.slow  # ~50-60 s: a reference run, then a loss, a reset and a comeback; the fast tier keeps the failure test
def test_a_lost_worker_is_replaced_from_the_last_commit_and_comes_back(tiny_synth, tmp_path):
    argv = ["--data", tiny_synth, *TRAIN, "--epochs", "6"]
    ref = run_gmeta("launch", "-np", "2", "train", *argv, "--output-dir", tmp_path / "ref", cwd=tmp_path, env=ENV)
    script, _ = _discovery(tmp_path, ["localhost", "127.0.0.1"])
    t0 = time.monotonic()
    # rank 1 vanishes after global step 7 (commits at 6 and 8): step 7 is lost and trained again
    proc = subprocess.run(_elastic(2, 1, script, "lo", [*argv, "--output-dir", tmp_path / "el"]), capture_output=True,
                          text=True, timeout=240, cwd=str(tmp_path),
                          # from step 8 on, steps last until the blacklisted host is back
                          env=dict(os.environ, **ENV, GMETA_FAULTS="train_step:die:7:1,train_step:slow:8"))
    took = time.monotonic() - t0
    err = proc.stderr
    assert proc.returncode == 0, err[-5000:]
    assert "exiting after global step 7" in err
    assert re.search(r"elastic reset 1: 1 worker\(s\) \(was 2\)", err), err[-4000:]
    assert re.search(r"resumed from \S+ckpt-000000006: .* re-sharded from 2 to 1 worker", err), err[-4000:]
    # the blacklisted host's cooldown ends, the discovery script still lists it: taken in again
    assert re.search(r"elastic reset 2: 2 worker\(s\) \(was 1\)", err), err[-4000:]
    assert re.search(r"re-sharded from 1 to 2 worker", err)
    out = last_json(proc)
    run_dir = Path(out["export"]).parent
    assert _check_no_row_lost(run_dir, before_loss=6) > 50
    a, b = out["user_cold"]["gauc_adapted"], last_json(ref)["user_cold"]["gauc_adapted"]
    print(f"elastic run {took:.1f} s; GAUC adapted {a} (disturbed) vs {b} (undisturbed)")
    assert abs(a - b) < 0.01, (a, b)


def test_a_failing_rank_ends_an_elastic_job_with_its_error(tiny_synth, tmp_path):
    """An error a reset does not repair (here: an injected exception) ends the job, on every
    rank, with that rank's message, instead of the others carrying on without it."""
    script, _ = _discovery(tmp_path, ["localhost", "127.0.0.1"])
    t0 = time.monotonic()
    proc = subprocess.run(_elastic(2, 1, script, "lo", ["--data", tiny_synth, *TRAIN, "--epochs", "3",
                                                        "--output-dir", tmp_path / "el"]),
                          capture_output=True, text=True, timeout=180, cwd=str(tmp_path),
                          env=dict(os.environ, **ENV, GMETA_FAULTS="train_step:raise:3:1"))
    assert proc.returncode != 0
    assert "ERROR RuntimeError: test hook GMETA_FAULTS: injected failure after global step 3" in proc.stderr
    assert re.search(r"elastic job ended: rank 1 failed with an error a reset does not repair \(RuntimeError: test "
                     r"hook GMETA_FAULTS", proc.stderr), proc.stderr[-4000:]
    assert time.monotonic() - t0 < 120


@pytest.mark.slow  # ~2-3 min: three namespace hosts, a reference run, a loss and a comeback
def test_three_hosts_lose_one_mid_run_finish_on_two_and_take_it_back(tiny_synth, tmp_path):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    argv = ["--data", tiny_synth, *TRAIN, "--epochs", "4", "--tasks-per-batch", "8"]
    ref = run_gmeta("launch", "-np", "3", "train", *argv, "--output-dir", tmp_path / "ref", cwd=tmp_path, env=ENV)
    with Cluster(3, 1, prefix="gmel", subnet="10.81.0.0/24") as cluster:
        names = [h.name for h in cluster.hosts]
        script, listing = _discovery(tmp_path, names)
        log_path = tmp_path / "job.log"
        with open(log_path, "w") as log:
            # a rank whose peer vanished mid-collective may only learn it from Gloo's timeout
            proc = cluster.popen(_elastic(3, 2, script, cluster.interface, [*argv, "--output-dir", tmp_path / "el"],
                                          ["--gloo-timeout-seconds", "15"]),
                                 stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                                 # from step 6 on, steps last until the host is back
                                 env=dict(os.environ, **ENV, GMETA_FAULTS="train_step:slow:6"),
                                 start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            _wait_for(log_path, r"checkpoint \S+ckpt-000000004 ", proc, deadline)
            lost = [int(p) for p in netns.ip("netns", "pids", names[2]).stdout.split()
                    if b"/gmeta\x00train" in Path(f"/proc/{p}/cmdline").read_bytes()]  # (not its sshd)
            assert lost, "no worker on the third host"
            listing.write_text("".join(f"{h}:1\n" for h in names[:2]))  # the host is gone
            t_kill = time.monotonic()
            for p in lost:
                os.kill(p, signal.SIGKILL)
            _wait_for(log_path, r"elastic reset \d+: 2 worker\(s\) \(was 3\)", proc, deadline)
            m = _wait_for(log_path, r"resumed from \S+ckpt-(\d+): .* re-sharded from 3 to 2 worker", proc, deadline)
            recovered_s = time.monotonic() - t_kill
            before_loss = int(m.group(1))
            # some steps on two hosts (the next checkpoint: every 2 steps, and at epoch ends), not
            # a fixed wait: faster steps had finished the run before the host was back
            _wait_for(log_path, rf"checkpoint \S+ckpt-0*({before_loss + 1}|{before_loss + 2}) ", proc, deadline)
            listing.write_text("".join(f"{h}:1\n" for h in names))  # and back
            t_back = time.monotonic()
            _wait_for(log_path, r"elastic reset \d+: 3 worker\(s\) \(was 2\)", proc, deadline)
            _wait_for(log_path, r"re-sharded from 2 to 3 worker", proc, deadline)
            back_s = time.monotonic() - t_back
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert proc.returncode == 0, text[-5000:]
    line = [ln for ln in text.splitlines() if '"user_cold"' in ln][-1]
    out = last_json(type("P", (), {"stdout": line})())
    assert _check_no_row_lost(Path(out["export"]).parent, before_loss) > 50
    a, b = out["user_cold"]["gauc_adapted"], last_json(ref)["user_cold"]["gauc_adapted"]
    commits = [float(s) for s in re.findall(r"checkpoint \S+ \(step \d+, [\d.]+ MB, ([\d.]+) s\)", text)]
    print(f"host lost: training resumed {recovered_s:.1f} s after the kill; host back: rejoined {back_s:.1f} s after "
          f"it was listed again; commits: {len(commits)}, median {np.median(commits):.3f} s; GAUC adapted {a} "
          f"(disturbed) vs {b} (undisturbed)")
    assert abs(a - b) < 0.01, (a, b)
