"""Multi-worker meta-learning: communication shape of a meta-step, and distributed == local."""

import numpy as np
import pytest
from conftest import REPO, horovodrun, read_rank_results
from test_meta_learner import SCHEMA, make_batch

EMB_DIM = 4  # ModelConfig(emb_dim=4) in tests/workers/meta_step_comm.py
F32 = 4      # bytes of a float32: vectors, gradients, touched counts, the loss sum and the task count
I64 = 8      # bytes of an int64 key


def _unique_rows(seed: int) -> dict:
    """{table: distinct ids >= 0} over support and query of ``make_batch(seed=seed)``: the rows
    one fused lookup of rank ``seed`` requests (ids of all features sharing a table deduped)."""
    batch = make_batch(seed=seed)
    per_table = {}
    for f in SCHEMA.sparse:
        ids = np.concatenate([batch[p][f.name].numpy().ravel() for p in ("support", "query")])
        per_table.setdefault(f.table, []).append(ids[ids >= 0])
    return {t: np.unique(np.concatenate(v)) for t, v in per_table.items()}


def _dense_bytes(res) -> int:
    return sum(int(np.prod(shape)) * itemsize for shape, itemsize in res["dense_shapes"])


@pytest.mark.parametrize("mode", ["hybrid", "naive"])
def test_meta_step_communication_shape(tmp_path, mode):
    """hybrid: ONE id/vector AlltoAll round trip per step for all tables together (not one per
    table), nothing in the inner loop, ONE fused allreduce of the dense gradients + loss, counts and the stop request.
    naive: no AlltoAll; ONE fused allreduce that also carries every full table gradient and its
    per-row touched count. Every byte count is derived here from shapes and the batches' ids."""
    np_ = 2
    horovodrun(np_, ["meta_step_comm.py", tmp_path, REPO / "tests", mode], timeout=240)
    # maml_dnn looks up every sparse feature of the schema: three tables, so a per-table
    # lookup (3 AlltoAlls of ids) cannot pass for a fused one
    tables = {t.name: t.num_rows for t in SCHEMA.tables if t.name in {f.table for f in SCHEMA.sparse}}
    assert len(tables) >= 2
    uniques = [_unique_rows(seed=r) for r in range(np_)]  # rank r trains on make_batch(seed=r)
    for rank, res in enumerate(read_rank_results(tmp_path, np_)):
        assert {t for _, t in res["looked_up"]} == set(tables)
        assert res["tables"] == {t: [rows, EMB_DIM] for t, rows in tables.items()}
        one, three = res["inner1"], res["inner3"]
        assert one == three, "more inner steps must add no collective"
        dense_bytes = _dense_bytes(res)
        assert one["broadcast"] == {"bytes": 0, "calls": 0}
        if mode == "hybrid":
            # + the loss sum, the task count, the real-task count and the stop request, which
            # ride in the same fused allreduce
            assert one["allreduce"] == {"calls": 1, "bytes": dense_bytes + 4 * F32}
            mine = sum(u.size for u in uniques[rank].values())
            # rows this rank serves: every rank's distinct rows whose owner (row % N) is this rank
            served = sum(int(np.sum(u % np_ == rank)) for per in uniques for u in per.values())
            assert one["alltoall_ids"] == {"calls": 1, "bytes": I64 * mine}
            assert one["alltoall_vectors"] == {"calls": 1, "bytes": F32 * EMB_DIM * served}
            assert one["alltoall_grads"] == {"calls": 1, "bytes": F32 * EMB_DIM * mine}
        else:
            tables_bytes = sum(rows * EMB_DIM * F32 + rows * F32 for rows in tables.values())
            assert one["allreduce"] == {"calls": 1, "bytes": dense_bytes + 4 * F32 + tables_bytes}
            for kind in ("alltoall_ids", "alltoall_vectors", "alltoall_grads"):
                assert one[kind] == {"bytes": 0, "calls": 0}, kind


@pytest.mark.parametrize("np_,modes,model", [(2, "hybrid,tiered-dense", "maml_dnn"),
                                             (3, "hybrid,tiered-sparse", "maml_esmm"),
                                             # naive == hybrid at 3 workers: test_embedding_dist.py
                                             pytest.param(2, "naive", "melu", marks=pytest.mark.slow)])
def test_distributed_meta_steps_equal_single_process(tmp_path, np_, modes, model):
    """N workers on slices of a global batch reach the same dense weights and tables as one
    process (tiered: hot rows replicated, with either sync)."""
    horovodrun(np_, ["meta_equivalence.py", tmp_path, REPO / "tests", modes, model], timeout=300)
    results = read_rank_results(tmp_path, np_)
    for res in (per_mode for rank_res in results for per_mode in rank_res.values()):
        assert set(results[0]) == set(modes.split(","))
        # training really moved the weights: Adam's first step moves the parameter with the
        # largest gradient by the learning rate (m / sqrt(v) = sign(g) after bias correction)
        assert res["first_step_move"] == pytest.approx(res["outer_lr"], rel=1e-3)
        for dist_loss, ref_loss in res["losses"]:
            assert dist_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        assert max(res["dense_max_diff"].values()) < 1e-5, res["dense_max_diff"]
        assert max(res["table_max_diff"].values()) < 1e-5, res["table_max_diff"]
