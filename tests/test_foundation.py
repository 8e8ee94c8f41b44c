"""The package, the CLI and real multi-process Horovod collectives (Gloo)."""

import ast
import importlib.util
import json
import re
import subprocess
import time

import pytest
from conftest import BIN, REPO, WORKERS, horovodrun, read_rank_results

# multi-worker test workers that must run under the trainer's failure guard (tests/workers/_guard.py)
GUARDED_WORKERS = ("collectives.py", "meta_step_comm.py", "meta_equivalence.py", "failing_rank.py",
                   "phase_equivalence.py", "ckpt_reshard.py")


def test_gmeta_help_lists_every_subcommand():
    """`gmeta --help` works without importing TensorFlow-heavy modules and lists the jobs."""
    out = subprocess.run([str(BIN / "gmeta"), "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("env", "datagen", "convert", "train", "evaluate", "register", "bench"):
        assert name in out


def _pins() -> dict:
    """{distribution: version} pinned in constraints.txt (the one stack the project runs on)."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _sok_version_here():
    """What this interpreter says about SOK: its version, or None when it does not import."""
    if importlib.util.find_spec("sparse_operation_kit") is None:
        return None
    try:
        import sparse_operation_kit as sok
    except Exception:  # noqa: BLE001 - installed but broken counts as absent, as gmeta env says
        return None
    return getattr(sok, "__version__", "unknown")


def test_gmeta_env_reports_tensorflow_and_gloo():
    """`gmeta env --json` reports the pinned stack, a Horovod built with TensorFlow and Gloo,
    and SOK exactly as this interpreter sees it (absent on CI, a version on GPU hosts)."""
    out = subprocess.run([str(BIN / "gmeta"), "env", "--json"], capture_output=True, text=True,
                         check=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    pins = _pins()
    tf_pin = pins.get("tensorflow-cpu") or pins["tensorflow"]
    assert info["tensorflow"] == tf_pin
    assert info["horovod"]["version"] == pins["horovod"]
    assert info["pyarrow"] == pins["pyarrow"]
    assert info["numpy"] == pins["numpy"]
    assert info["horovod"]["gloo_built"] is True
    assert info["horovod"]["tensorflow_built"] is True
    sok = _sok_version_here()
    if sok is None:
        assert info["sok"].startswith("absent"), info["sok"]
    else:
        assert info["sok"] == sok


def test_subpackages_import_under_gmeta():
    import gmeta.io.schema
    import gmeta.models.layers
    import gmeta.trainer.parallel.comm

    assert gmeta.io.schema.__name__ == "gmeta.io.schema"
    # the project's io package never shadows the standard library's io
    import io
    assert hasattr(io, "BytesIO")


@pytest.mark.parametrize("np_", [pytest.param(2, marks=pytest.mark.slow), 3])  # 3: the fast tier
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
        # counters: bytes of the float32 tensors each call handed over, from their shapes
        c = res["counters"]
        grouped = 4 * (len(res["mean"]) + len(res["mean2"]) * len(res["mean2"][0]))
        assert c["allreduce"] == {"calls": 2, "bytes": grouped + 4}  # grouped call + scalar sum
        sent_rows, received_rows = sum(j + 1 for j in range(np_)), np_ * (me + 1)
        assert c["alltoall_vectors"] == {"calls": 1, "bytes": 4 * 2 * sent_rows}
        assert c["alltoall_grads"] == {"calls": 1, "bytes": 4 * 2 * received_rows}
        assert c["alltoall_ids"] == {"calls": 0, "bytes": 0}
        assert c["broadcast"] == {"calls": 0, "bytes": 0}


def test_failing_rank_ends_the_job_with_its_message():
    """Rank 1 failing inside a traced step while rank 0 waits in that step's allreduce ends the
    job, non-zero, within 60 s, with rank 1's message as the guard reports it."""
    t0 = time.monotonic()
    proc = horovodrun(2, ["failing_rank.py"], timeout=120, check=False)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    rank1 = "\n".join(line for line in out.splitlines() if line.startswith("[1]<stderr>:"))
    assert "[gmeta rank 1] ERROR" in rank1, out[-3000:]
    assert "rank 1 found a corrupt input file: bad.orc" in rank1, out[-3000:]
    # rank 1 left first; rank 0 (blocked in the allreduce) was ended after it
    assert re.search(r"first process to do so was:\s*Process name: 1\b", out), out[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"


def _runs_guarded(stmt) -> bool:
    """``guard(main, ...)``, ``sys.exit(run_guarded(main, ...))`` or either under ``if __name__``."""
    if isinstance(stmt, ast.If) and "__name__" in ast.unparse(stmt.test):
        return any(_runs_guarded(s) for s in stmt.body)
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
        return False
    call = ast.unparse(stmt.value)
    return call.startswith("guard(") or call.startswith("sys.exit(run_guarded(")


@pytest.mark.parametrize("name", GUARDED_WORKERS)
def test_workers_run_under_the_failure_guard(name):
    """Each multi-worker test worker does all its work inside the trainer's failure guard (its
    last statement runs the body guarded; above it only imports, definitions and constants), so
    a failing rank ends the job as in the test above instead of at the pytest timeout."""
    tree = ast.parse((WORKERS / name).read_text())
    *head, last = tree.body
    assert _runs_guarded(last), f"{name}: last statement is {ast.unparse(last)!r}"
    for stmt in head:
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring
        code = ast.unparse(stmt)
        if code.startswith("sys.path.insert("):
            continue
        assert isinstance(stmt, ast.Assign) and not any(isinstance(n, ast.Call) for n in ast.walk(stmt)), \
            f"{name}: top-level statement outside the guard: {code!r}"
