"""The projection bench is a model; its arithmetic is checked here by hand-worked values."""

import pytest

from gmeta.tools.bench_projection import project


def test_projection_follows_the_stated_model():
    measured = {"np": 2, "rows": 1000, "dim": 8, "tasks": 10, "support": 8, "query": 2, "hybrid_ms": 10.0,
                "hybrid_bytes_by_kind": {"alltoall_ids": 1e6, "alltoall_vectors": 2e6, "alltoall_grads": 2e6,
                                         "allreduce": 1e6, "broadcast": 0},
                "hybrid_bytes_per_step": 6e6, "naive_bytes_per_step": 101e6}
    (row,) = project(measured, workers=(4,), networks=(8.0,))["rows"]  # 1e9 bytes/s
    # hybrid: 0.75 * 5e6 alltoall + 2 * 0.75 * 1e6 allreduce = 5.25e6 bytes = 5.25 ms on top of 10 ms
    assert row["hybrid_efficiency"] == pytest.approx(10 / 15.25, abs=1e-3)
    assert row["hybrid_samples_per_s"] == round(4 * 100 / 0.01525)
    # naive: 2 * 0.75 * (1e6 + 100e6) = 151.5e6 bytes = 151.5 ms
    assert row["naive_efficiency"] == pytest.approx(10 / 161.5, abs=1e-3)
