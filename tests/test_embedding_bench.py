"""`gmeta bench step`: a real 2-worker run on a small table, checked against analytic counts."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gmeta.tools import bench_step

BIN = Path(sys.executable).parent


def test_bench_step_reports_analytic_bytes_and_half_memory():
    """Bytes per worker equal the analytic hybrid/naive counts; memory per worker halves."""
    argv = ["bench", "step", "--json", "--np", "2", "--rows", "20000", "--dim", "8",
            "--batch-ids", "400", "--steps", "2", "--warmup", "1", "--optimizer", "adam"]
    proc = subprocess.run([str(BIN / "gmeta")] + argv, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                               "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "with --json stdout holds only the JSON line"
    r = json.loads(lines[-1])
    assert "naive/hybrid" in proc.stderr  # the table went to stderr

    parser = argparse.ArgumentParser()
    bench_step.add_arguments(parser)
    cfg = bench_step._config(parser.parse_args(argv[2:]))
    uniq = [np.unique(np.concatenate([b["item_id"], b["hist_items"].ravel()])) for b in
            (bench_step.draw_ids(cfg, rank, s) for rank in range(2) for s in range(1, 3))]
    uniq = [u[u >= 0].size for u in uniq]
    mean_unique = float(np.mean(uniq))  # per worker per timed step
    assert r["hybrid_bytes_by_kind"]["alltoall_ids"] == round(8 * mean_unique)
    # every row a worker receives it also serves to someone: vector and gradient bytes average
    # to the same per-worker figure
    assert r["hybrid_bytes_by_kind"]["alltoall_vectors"] == round(4 * 8 * mean_unique)
    assert r["hybrid_bytes_by_kind"]["alltoall_grads"] == round(4 * 8 * mean_unique)
    assert r["naive_bytes_per_step"] == 20000 * 8 * 4 + 20000 * 4
    assert r["bytes_ratio"] == pytest.approx(r["naive_bytes_per_step"] / r["hybrid_bytes_per_step"],
                                             rel=1e-3)
    # adam: params + m + v; hybrid holds half the rows
    assert r["naive_memory_bytes"] == 20000 * 8 * 4 * 3
    assert r["hybrid_memory_bytes"] == r["naive_memory_bytes"] // 2
    assert r["memory_ratio"] == 2.0
    assert r["hybrid_ms"] > 0 and r["naive_ms"] > 0


@pytest.mark.parametrize("flag, message", [("--zipf=1.0", "--zipf must be > 1"),
                                           ("--np=0", "--np must be >= 1"),
                                           ("--optimizer=rmsprop", "--optimizer must be")])
def test_bench_step_rejects_bad_flags(flag, message):
    """Bad flags stop before anything is launched, naming the flag."""
    parser = argparse.ArgumentParser()
    bench_step.add_arguments(parser)
    with pytest.raises(SystemExit, match=message):
        bench_step.main(parser.parse_args([flag]))
