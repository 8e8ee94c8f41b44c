"""Multi-worker meta-learning: communication shape of a meta-step, and distributed == local."""

import json

import pytest

from conftest import REPO, horovodrun, read_rank_results


def test_meta_step_communication_shape(tmp_path):
    """One id/vector AlltoAll round trip per step, nothing in the inner loop, one fused allreduce."""
    horovodrun(2, ["meta_step_comm.py", tmp_path, REPO / "tests"], timeout=240)
    for res in read_rank_results(tmp_path, 2):
        one, three = res["inner1"], res["inner3"]
        # more inner steps add no collective at all
        assert one == three
        assert one["allreduce"]["calls"] == 1
        assert one["allreduce"]["bytes"] == res["dense_bytes"]
        lookups = one["alltoall_ids"]["calls"]
        assert lookups in (1, res["tables"])  # fused across tables, or one per table
        assert one["alltoall_vectors"]["calls"] == lookups
        assert one["alltoall_grads"]["calls"] == lookups
        assert one["broadcast"]["calls"] == 0
