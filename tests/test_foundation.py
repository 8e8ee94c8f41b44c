"""The package, the CLI and real multi-process Horovod collectives (Gloo)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, horovodrun, read_rank_results


def test_gmeta_help_lists_every_subcommand():
    """`gmeta --help` works without importing TensorFlow-heavy modules and lists the jobs."""
    out = subprocess.run([str(BIN / "gmeta"), "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("env", "datagen", "convert", "train", "evaluate", "register", "bench"):
        assert name in out


def test_gmeta_env_reports_tensorflow_and_gloo():
    """`gmeta env --json` names TF 2.17.1 and a Horovod built with TensorFlow and Gloo."""
    out = subprocess.run([str(BIN / "gmeta"), "env", "--json"], capture_output=True, text=True,
                         check=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["tensorflow"] == "2.17.1"
    assert info["horovod"]["version"] == "0.28.1"
    assert info["horovod"]["gloo_built"] is True
    assert info["horovod"]["tensorflow_built"] is True
    assert info["pyarrow"].startswith("19.")
    assert info["sok"].startswith("absent")


def test_subpackages_import_under_gmeta():
    import gmeta.io.schema
    import gmeta.models.layers
    import gmeta.trainer.comm

    assert gmeta.io.schema.__name__ == "gmeta.io.schema"
    # the project's io package never shadows the standard library's io
    import io
    assert hasattr(io, "BytesIO")


@pytest.mark.parametrize("np_", [2, 3])
def test_collectives_route_by_rank(tmp_path, np_):
    """allreduce, grouped allreduce and alltoall with uneven splits, in tf.function, plus gradient."""
    horovodrun(np_, ["collectives.py", tmp_path], timeout=240)
    results = read_rank_results(tmp_path, np_)
    for me, res in enumerate(results):
        # rank `me` receives (me + 1) rows from every sender s, each holding 100 * s + me
        assert res["recv_splits"] == [me + 1] * np_
        expected = [[100.0 * s + me] * 2 for s in range(np_) for _ in range(me + 1)]
        assert res["recv"] == expected
        # d loss / d sent row to rank j = (me + 1), the weight rank j applies to rows from `me`
        grad = [[float(me + 1)] * 2 for j in range(np_) for _ in range(j + 1)]
        assert res["grad"] == grad
        assert res["mean"] == [sum(range(np_)) / np_] * 3
        assert res["mean2"] == [[sum(r + 1 for r in range(np_)) / np_]]
        assert res["sum"] == float(sum(range(np_)))
        c = res["counters"]
        assert c["allreduce"]["calls"] == 2
        assert c["allreduce"]["bytes"] == 4 * (3 + 1) + 4
        assert c["alltoall_vectors"]["bytes"] == 4 * 2 * sum(j + 1 for j in range(np_))
        assert c["alltoall_grads"]["calls"] == 1


def test_failing_rank_ends_the_job_with_its_message(tmp_path):
    """One rank raising while the other waits in a collective ends the job, non-zero, quickly."""
    t0 = time.time()
    proc = horovodrun(2, ["failing_rank.py"], timeout=120, check=False)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert "corrupt input file: bad.orc" in proc.stdout + proc.stderr
    assert "rank 1" in proc.stdout + proc.stderr
    assert elapsed < 90
