"""`gmeta bench step`: a real 2-worker run on a small table, checked against analytic counts."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gmeta.tools.bench import step as bench_step

BIN = Path(sys.executable).parent


@pytest.mark.slow  # a benchmark's own check; the byte counts it relies on: test_embedding_dist.py
def test_bench_step_reports_analytic_bytes_and_half_memory():
    """Every byte and memory figure equals its analytic value, derived here from the drawn ids
    and the table shape; timings fit inside the wall clock of the run."""
    np_, rows, dim, steps, warmup = 2, 20000, 8, 2, 1
    argv = ["bench", "step", "--json", "--np", str(np_), "--rows", str(rows), "--dim", str(dim),
            "--batch-ids", "400", "--steps", str(steps), "--warmup", str(warmup), "--optimizer", "adam"]
    t0 = time.monotonic()
    proc = subprocess.run([str(BIN / "gmeta")] + argv, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                               "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"})
    wall_ms = 1000.0 * (time.monotonic() - t0)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "with --json stdout holds only the JSON line"
    r = json.loads(lines[-1])
    assert "naive/hybrid" in proc.stderr  # the table went to stderr

    # the ids each worker looks up in each timed step (the bench's own deterministic draw)
    parser = argparse.ArgumentParser()
    bench_step.add_arguments(parser)
    cfg = bench_step._config(parser.parse_args(argv[2:]))
    uniq = [np.unique(np.concatenate([b["item_id"], b["hist_items"].ravel()])) for b in
            (bench_step.draw_ids(cfg, rank, s) for rank in range(np_) for s in range(warmup, warmup + steps))]
    mean_unique = float(np.mean([u[u >= 0].size for u in uniq]))  # per worker per timed step
    assert r["unique_ids_per_step"] == pytest.approx(mean_unique)

    # hybrid: one int64 key out and one float32 vector back per distinct id, and the vector's
    # gradient along the reverse route; every row a worker receives it also serves to someone,
    # so vector and gradient bytes average to the same per-worker figure
    by_kind = {"alltoall_ids": 8 * mean_unique, "alltoall_vectors": 4 * dim * mean_unique,
               "alltoall_grads": 4 * dim * mean_unique}
    assert r["hybrid_bytes_by_kind"] == {**{k: round(v) for k, v in by_kind.items()},
                                         "allreduce": 0, "broadcast": 0, "hot_sync": 0}
    hybrid_bytes = sum(by_kind.values())
    # naive: the full table gradient plus a float32 touched count per row, in one allreduce
    naive_bytes = rows * dim * 4 + rows * 4
    assert r["hybrid_bytes_per_step"] == pytest.approx(hybrid_bytes, abs=1)
    assert r["naive_bytes_per_step"] == naive_bytes
    assert r["bytes_ratio"] == pytest.approx(naive_bytes / hybrid_bytes, abs=0.006)  # 2 decimals
    assert r["meets_target"] is (naive_bytes / hybrid_bytes >= bench_step.TARGET_BYTES_RATIO)

    # adam keeps params + m + v per row; a hybrid worker holds the rows it owns (row % N)
    naive_memory = rows * dim * 4 * 3
    hybrid_memory = max(int(np.sum(np.arange(rows) % np_ == k)) for k in range(np_)) * dim * 4 * 3
    assert r["naive_memory_bytes"] == naive_memory
    assert r["hybrid_memory_bytes"] == hybrid_memory
    assert r["memory_ratio"] == pytest.approx(naive_memory / hybrid_memory, abs=5e-4)  # 3 decimals

    # ms per timed step: the timed steps of both modes happened inside this run
    assert 0 < (r["hybrid_ms"] + r["naive_ms"]) * steps < wall_ms


@pytest.mark.parametrize("flag, message", [("--zipf=1.0", "--zipf must be > 1"),
                                           ("--np=0", "--np must be >= 1"),
                                           ("--optimizer=rmsprop", "--optimizer must be")])
def test_bench_step_rejects_bad_flags(flag, message):
    """Bad flags stop before anything is launched, naming the flag."""
    parser = argparse.ArgumentParser()
    bench_step.add_arguments(parser)
    with pytest.raises(SystemExit, match=message):
        bench_step.main(parser.parse_args([flag]))
