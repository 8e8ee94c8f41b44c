"""Sharding across ranks: every task exactly once per epoch, every rank the same number of steps."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from conftest import horovodrun, read_rank_results  # noqa: E402
from io_data import write_tiny  # noqa: E402

from gmeta.io.plan import Unit, shard_tasks  # noqa: E402
from gmeta.io.reader import MetaReader  # noqa: E402

N_TASKS = 97


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_tiny(d, n_tasks=N_TASKS, rows_per_stripe=30, rows_per_file=90, tasks_per_write=5)
    return str(d)


def run_ranks(data, world_size, epoch=0, T=4):
    """Instantiate every rank's reader in this process; return (readers, per-rank task ids, steps)."""
    readers = [MetaReader(data, rank=r, world_size=world_size, tasks_per_batch=T, support_size=4, query_size=2,
                          shuffle=True, seed=11) for r in range(world_size)]
    ids, steps = [], []
    for r in readers:
        got, n = [], 0
        for b in r.numpy_batches(epoch):
            n += 1
            got += b["task_id"][b["task_mask"] > 0].tolist()
            assert (b["task_id"][b["task_mask"] == 0] == -1).all()
        ids.append(got)
        steps.append(n)
    return readers, ids, steps


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_every_task_exactly_once_and_equal_steps(data, world_size, epoch):
    """Union over ranks = all tasks, no duplicates; every rank yields steps_per_epoch batches."""
    readers, ids, steps = run_ranks(data, world_size, epoch)
    flat = [t for rank_ids in ids for t in rank_ids]
    assert sorted(flat) == list(range(N_TASKS))
    plan = {r.steps_per_epoch for r in readers}
    assert len(plan) == 1, f"ranks disagree on steps_per_epoch: {plan}"
    assert steps == [readers[0].steps_per_epoch] * world_size
    assert readers[0].steps_per_epoch == -(-max(len(i) for i in ids) // 4)
    for r, rank_ids in zip(readers, ids):
        assert len(rank_ids) == r.num_tasks == r.tasks_per_rank[r.rank]
    counts = [len(i) for i in ids]
    assert max(counts) - min(counts) <= 1, counts
    # a stripe is shared by at most two neighbouring ranks; whole stripes by exactly one
    held = [(u.file, u.stripe) for r in readers for u in r.my_units]
    assert len(held) - len(set(held)) <= world_size - 1
    assert set(held) == {(u.file, u.stripe) for u in readers[0].units}


def test_task_ranges_are_balanced_contiguous_and_deterministic():
    """Every rank's count within one of the others, tasks covered once in file order, whatever
    the stripe sizes (one huge stripe, many small ones, more ranks than tasks)."""
    rng = np.random.default_rng(0)
    for sizes in (rng.integers(1, 50, 40).tolist(), [1000], [3, 500, 2], [1, 1]):
        units, first = [], 0
        for i, n in enumerate(sizes):
            units.append(Unit(f"f{i // 4}.orc", i % 4, 10 * n, n, first, first + n - 1))
            first += n
        for world in (1, 2, 3, 5):
            plan = shard_tasks(units, world)
            assert plan == shard_tasks(list(units), world)
            counts = [sum(u.share for u in p) for p in plan]
            assert max(counts) - min(counts) <= 1 and sum(counts) == sum(sizes), (sizes, world, counts)
            covered = [u.first_task + k for p in plan for u in p
                       for k in range(u.lo, u.lo + u.share)]
            assert covered == list(range(sum(sizes)))


def test_more_ranks_than_stripes(tmp_path):
    """One stripe, three ranks: each decodes it and keeps its own task range (2 tasks each),
    with exact per-rank read counts; a rank with no task at all yields padding batches only."""
    write_tiny(tmp_path, n_tasks=6, rows_per_stripe=1000)  # one stripe
    readers, ids, steps = run_ranks(str(tmp_path), 3, T=4)
    assert sorted(t for i in ids for t in i) == list(range(6))
    assert steps == [1, 1, 1]
    assert [len(i) for i in ids] == [2, 2, 2]
    assert sum(r.stats["tasks_read"] for r in readers) == 6
    assert sum(r.stats["rows_read"] for r in readers) == readers[0].units[0].rows
    assert [r.stats["padding_tasks"] for r in readers] == [2, 2, 2]
    readers, ids, steps = run_ranks(str(tmp_path), 8, T=4)
    assert sorted(len(i) for i in ids) == [0, 0] + [1] * 6 and steps == [1] * 8
    empty = [r for r in readers if not r.my_units][0]
    assert empty.stats["padding_tasks"] == 4


@pytest.mark.slow  # fast tier: every rank's reader in one process (the tests above), tf.data under horovodrun in test_bad_input.py
def test_horovodrun_two_workers_read_disjoint_shards(data, tmp_path):
    """Real horovodrun -np 2 (Gloo): each rank reads its shard via tf.data; together every task once,
    equal step counts, and a per-step allreduce that completes on both ranks."""
    horovodrun(2, ["io_shard.py", data, str(tmp_path)], timeout=120)
    results = read_rank_results(tmp_path, 2)
    assert [r["rank"] for r in results] == [0, 1] and all(r["size"] == 2 for r in results)
    ids = [t for r in results for t in r["task_ids"]]
    assert sorted(ids) == list(range(N_TASKS)), "a task was lost or delivered twice"
    steps = {r["steps"] for r in results} | {r["steps_per_epoch"] for r in results}
    assert len(steps) == 1
    (n,) = steps
    assert all(r["allreduce_total"] == 2.0 * n for r in results)
    assert all(len(r["task_ids"]) == r["tasks_planned"] > 0 for r in results)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Stripes with very different task counts: runs of small tasks, one huge task (120 rows, a
    stripe of its own) and small leftovers at file ends."""
    import pyarrow as pa
    from io_data import make_table, tiny_schema

    from gmeta.io.writer import TaskWriter, write_dataset_schema

    d = tmp_path_factory.mktemp("uneven")
    schema = tiny_schema()
    with TaskWriter(str(d), schema, rows_per_stripe=40, rows_per_file=150) as w:
        w.write(make_table(np.arange(0, 30)))
        w.write(pa.concat_tables([make_table([30])] * 40))
        w.write(make_table(np.arange(31, 46)))
        w.write(make_table(np.arange(46, 70)))
    write_dataset_schema(str(d), schema)
    counts = [s["tasks"] for f in w.index["files"] for s in f["stripes"]]
    assert len(w.index["files"]) >= 2 and len(set(counts)) >= 3 and min(counts) == 1, counts
    return str(d)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_uneven_stripes_through_tf_data(uneven, world_size):
    """Same guarantees through reader.dataset() (tf.data) over two epochs with very uneven stripes."""
    readers = [MetaReader(uneven, rank=r, world_size=world_size, tasks_per_batch=4, support_size=8,
                          query_size=4, shuffle=True, seed=1, shuffle_buffer_tasks=8) for r in range(world_size)]
    (spe,) = {r.steps_per_epoch for r in readers}
    for epoch in (0, 1):
        ids, steps = [], []
        for r in readers:
            got = [b["task_id"][b["task_mask"] == 1] for b in r.dataset(epoch).as_numpy_iterator()]
            steps.append(len(got))
            ids.append(np.concatenate(got))
        assert steps == [spe] * world_size
        assert sorted(np.concatenate(ids).tolist()) == list(range(70)), f"epoch {epoch}"
