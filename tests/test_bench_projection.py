"""The projection and breakdown benches: their arithmetic and op attribution by hand-worked values."""

import pytest

from gmeta.tools.bench.projection import project


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


def test_breakdown_assigns_traced_ops_to_the_step_stages():
    from gmeta.tools.bench.breakdown import stage_of

    assert stage_of("lookup/HorovodAlltoall_x:HorovodAlltoall") == "lookup"
    assert stage_of("inner_loop/gradient_tape/einsum/Einsum:Einsum") == "inner_loop"   # the inner tape
    assert stage_of("gradient_tape/inner_loop/einsum/Einsum_1:Einsum") == "outer_backward"
    assert stage_of("allreduce/HorovodGroupedAllreduce:HorovodGroupedAllreduce") == "allreduce"
    assert stage_of("optimizer/Adam/mul:Mul") == "optimizer"
    assert stage_of("batch:_Arg") == "other"
