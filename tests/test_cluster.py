"""Training across hosts, for real, on one machine: a cluster of network-namespace hosts
(gmeta.tools.cluster) with an sshd each; horovodrun on the head host starts the other host's
workers over ssh and Gloo talks across the namespaces' bridge. Skipped, with the reason, where
the machine cannot make one (not root, no iproute2, no sshd, namespaces refused)."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, last_json, run_gmeta

from gmeta.tools.cluster import netns
from gmeta.tools.cluster.cluster import Cluster, teardown, unavailable
from gmeta.trainer.checkpoint.files import committed_checkpoints

PREFIX = "gmtest"  # not the CLI's default: a user's own cluster is never touched
SUBNET = "10.79.0.0/24"
# tiny and deterministic: --input-sharding replicated makes the result independent of placement
TRAIN = ["--model", "melu", "--input-sharding", "replicated", "--seed", "0", "--epochs", "1", "--log-every", "0",
         "--no-saved-model", "--validation-split", "none", "--support-curve", "none", "--plain-baseline", "off",
         "--eval-splits", "user_cold"]
# many short epochs: still training when the link is cut
LONG = ["--model", "maml_dnn", "--epochs", "60", "--tasks-per-batch", "16", "--log-every", "0", "--no-saved-model",
        "--plain-baseline", "off", "--validation-split", "none", "--support-curve", "none", "--eval-splits", "user_cold"]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _leftovers(prefix=PREFIX) -> list:
    found = [ns for ns in netns.namespaces() if ns.startswith(prefix + "-")]
    found += [p for p in (Path(netns.NETNS_ETC).glob(prefix + "-*") if Path(netns.NETNS_ETC).is_dir() else [])]
    found += [p for p in Path("/tmp").glob(f"gmeta-cluster-{prefix}")]
    return found


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Cluster(2, 1, prefix=PREFIX, subnet=SUBNET) as c:
        yield c
    assert _leftovers() == []


def _launch(cluster, hosts, argv, cwd, timeout=300):
    """``gmeta launch`` on the head host, across ``hosts``."""
    cmd = [BIN / "gmeta", "launch", "-np", "2", "-H", hosts, "--network-interface", cluster.interface, *argv]
    return cluster.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(cwd), env=dict(os.environ, **ENV))


def _runs(uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("gmeta").experiment_id])


def test_a_cluster_comes_up_reaches_every_host_over_ssh_and_leaves_nothing_behind():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    prefix = "gmtest2"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="inside"):
        with Cluster(2, 2, prefix=prefix, subnet="10.80.0.0/24") as c:
            up_s = time.monotonic() - t0
            assert c.host_string() == f"{prefix}-h0:2,{prefix}-h1:2" and c.interface == netns.IFACE
            # the far host by name, over ssh, from the head: its own namespace answers
            proc = c.run(["ssh", f"{prefix}-h1", "ip", "-4", "-o", "addr", "show", netns.IFACE],
                         capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0 and "10.80.0.3/24" in proc.stdout, proc.stderr
            # the subnet exists only inside the namespaces
            assert "10.80.0." not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
            assert len(_leftovers(prefix)) == 6  # 3 namespaces (2 hosts, the bridge), 2 /etc/netns dirs, the state
            raise RuntimeError("a failure inside the block")  # teardown must still happen
    assert _leftovers(prefix) == []
    assert up_s < 10, up_s
    assert not Path(os.path.expanduser("~/.ssh/known_hosts")).exists() or \
        prefix not in Path(os.path.expanduser("~/.ssh/known_hosts")).read_text()
    assert teardown(prefix, f"/tmp/gmeta-cluster-{prefix}") == []  # down again: nothing to do


def test_training_across_two_hosts_gives_the_one_host_result(cluster, tiny_synth, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    h0, h1 = (h.name for h in cluster.hosts)
    across = _launch(cluster, f"{h0}:1,{h1}:1",
                     ["train", "--data", tiny_synth, *TRAIN, "--tracking-uri", uri, "--output-dir", tmp_path / "x"],
                     tmp_path)
    assert across.returncode == 0, across.stderr[-4000:]
    local = run_gmeta("launch", "-np", "2", "train", "--data", tiny_synth, *TRAIN, "--tracking-uri", "none",
                      "--output-dir", tmp_path / "l", cwd=tmp_path, env=ENV)
    a, b = last_json(across)["user_cold"], last_json(local)["user_cold"]
    assert a["tasks"] == b["tasks"] == 60
    for key in ("gauc_adapted", "gauc_unadapted", "ndcg10_adapted", "gauc_adapted_minus_unadapted"):
        assert a[key] == b[key], (key, a[key], b[key])
    # MLflow: one run, written by rank 0 only
    runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["user_cold.gauc_adapted"] == pytest.approx(a["gauc_adapted"], abs=1e-5)
    # checkpoints: each rank wrote its shard into the directory both hosts see
    ckpt_dir = tmp_path / "x" / last_json(across)["run_id"] / "checkpoints"
    steps = committed_checkpoints(str(ckpt_dir))
    assert steps, list(ckpt_dir.iterdir())
    last = ckpt_dir / f"ckpt-{steps[-1][0]:09d}"
    assert {p.name for p in last.glob("shard-*")} == {"shard-00000-of-00002.npz", "shard-00001-of-00002.npz"}

    # a dataset one host cannot see: the error names that host and the path
    proc = _launch(cluster, f"{h0}:1,{h1}:1", ["train", "--data", tmp_path / "nowhere", *TRAIN, "--tracking-uri",
                                               "none"], tmp_path, timeout=120)
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert re.search(re.escape(f"--data {tmp_path}/nowhere: not found on host ") + rf"({h0}|{h1}) \(rank [01]\)", last_line), \
        proc.stderr[-3000:]


@pytest.mark.slow  # ~90 s: Gloo's 30 s timeout, then a resume; the fast tier checks cross-host training above
def test_a_host_cut_off_mid_step_ends_every_rank_within_60s_naming_it_and_resume_completes(cluster, tiny_synth,
                                                                                             tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    h0, h1 = (h.name for h in cluster.hosts)
    log_path = tmp_path / "job.log"
    argv = [BIN / "gmeta", "launch", "-np", "2", "-H", f"{h0}:1,{h1}:1", "--network-interface", cluster.interface,
            "train", "--data", tiny_synth, *LONG, "--tracking-uri", uri, "--output-dir", tmp_path / "runs"]
    with open(log_path, "w") as log:
        proc = cluster.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                             env=dict(os.environ, **ENV), start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not re.search(r"checkpoint \S+ckpt-000000020", log_path.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        far = [int(p) for p in netns.ip("netns", "pids", h1).stdout.split()
               if "gmeta.cli" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert far, "no worker on the far host"
        t0 = time.monotonic()
        cluster.cut(1)  # mid-epoch 2: the next collective cannot complete
        proc.wait(timeout=60)
        launcher_s = time.monotonic() - t0
        while any(Path(f"/proc/{p}").exists() for p in far) and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        far_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.reconnect(1)
    text = log_path.read_text()
    print(f"link cut: launcher exited after {launcher_s:.1f} s, the far host's rank after {far_s:.1f} s")
    assert proc.returncode != 0 and far_s < 60, (far_s, text[-3000:])
    assert re.search(rf"gmeta launch: host {h1} \(rank 1\) is unreachable", text), text[-3000:]
    assert "Process 0 exit with status code 1" in text  # rank 0 failed on its own (Gloo's timeout)
    runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"

    # resume, with the ranks' hosts swapped: the far host reads what the head host's rank wrote
    ckpt = re.findall(r"checkpoint (\S+/checkpoints)/ckpt-", text)[-1]
    resumed = _launch(cluster, f"{h1}:1,{h0}:1",
                      ["train", "--data", tiny_synth, *LONG[:2], "--epochs", "4", *LONG[4:], "--tracking-uri", uri,
                       "--output-dir", tmp_path / "runs", "--resume", "--checkpoint-dir", ckpt], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert last_json(resumed)["run_id"] == runs[0].info.run_id
    runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
