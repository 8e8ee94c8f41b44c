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
        assert one["allreduce"]["bytes"] == res["dense_bytes"] + 4  # + the real-task count
        lookups = one["alltoall_ids"]["calls"]
        assert lookups in (1, res["tables"])  # fused across tables, or one per table
        assert one["alltoall_vectors"]["calls"] == lookups
        assert one["alltoall_grads"]["calls"] == lookups
        assert one["broadcast"]["calls"] == 0


@pytest.mark.parametrize("np_,mode,model", [(2, "hybrid", "maml_dnn"), (3, "hybrid", "maml_esmm"),
                                            (2, "naive", "melu")])
def test_distributed_meta_steps_equal_single_process(tmp_path, np_, mode, model):
    """N workers on slices of a global batch reach the same dense weights and tables as one process."""
    horovodrun(np_, ["meta_equivalence.py", tmp_path, REPO / "tests", mode, model], timeout=300)
    for res in read_rank_results(tmp_path, np_):
        assert res["moved"] > 1e-3  # training really changed the weights
        for dist_loss, ref_loss in res["losses"]:
            assert dist_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        assert max(res["dense_max_diff"].values()) < 1e-5, res["dense_max_diff"]
        assert max(res["table_max_diff"].values()) < 1e-5, res["table_max_diff"]


def test_two_workers_reach_the_single_worker_auc(tiny_synth, tmp_path):
    """`gmeta train` on 2 workers (hybrid and naive) reproduces the 1-worker test AUC."""
    from conftest import BIN, last_json, run_gmeta

    flags = ["--model", "maml_dnn", "--data", tiny_synth, "--epochs", "2", "--tracking-uri", "none",
             "--log-every", "0", "--input-sharding", "replicated", "--output-dir", tmp_path / "runs"]
    one = last_json(run_gmeta("train", *flags, "--tasks-per-batch", "16", cwd=tmp_path))
    for mode in ("hybrid", "naive"):
        two = last_json(horovodrun(2, [BIN / "gmeta", "train", *flags, "--tasks-per-batch", "8",
                                       "--parallel", mode], timeout=400))
        for split, res in one.items():
            for key in ("auc_adapted", "auc_unadapted"):
                assert abs(two[split][key] - res[key]) <= 0.002, (mode, split, key, two[split], res)
            assert two[split]["rows"] == res["rows"]
