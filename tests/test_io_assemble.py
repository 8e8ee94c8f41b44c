"""Batch assembly (gmeta.io.assemble) on hand-made RecordBatches: every expected value below is
worked out by hand from the rows listed in ``ROWS``."""

import numpy as np
import pyarrow as pa
import pytest

from gmeta.io.assemble import STAT_KEYS, Block, Layout, batch_of, build_block, compact, empty_block, gather_tasks
from gmeta.io.errors import DataError
from gmeta.io.schema import DenseFeature, Schema, SparseFeature, TableSpec

SCHEMA = Schema(labels=("click",), sparse=(SparseFeature("user_id", "user"), SparseFeature("tags", "tag", max_len=2)),
                dense=(DenseFeature("price"),), tables=(TableSpec("user", 10), TableSpec("tag", 5, hashed=True)),
                oracle=("p",))
LAY = Layout(SCHEMA)

# task, is_query, user_id, tags (hashed: 5 buckets, max_len 2), price. Task 5 lists its query row
# FIRST; task 8 has 3 support and 2 query rows; row 2 has one tag past max_len.
ROWS = [(5, 1, 1, [7], 0.0),
        (5, 0, 2, [], 1.0),
        (5, 0, 3, [1, 2, 3], 2.0),
        (8, 0, 4, [4], 3.0),
        (8, 0, 5, [0, 9], 4.0),
        (8, 0, 6, [], 5.0),
        (8, 1, 7, [2], 6.0),
        (8, 1, 8, [], 7.0)]


def record_batch(rows) -> pa.RecordBatch:
    task, flag, user, tags, price = zip(*rows) if rows else ([],) * 5
    n = len(task)
    return pa.RecordBatch.from_pydict({
        "task_id": pa.array(task, pa.int64()), "is_query": pa.array(flag, pa.int8()),
        "click": pa.array(np.arange(n) % 2, pa.float32()), "user_id": pa.array(user, pa.int64()),
        "tags": pa.array(tags, pa.list_(pa.int64())), "price": pa.array(price, pa.float32()),
        "p": pa.array([0.5] * n, pa.float32())})


def build(rows, S, Q):
    return build_block(record_batch(rows), LAY, S, Q, "f.orc", 3)


def test_layout_places_columns():
    """Single ids first, then each list feature's max_len rows; floats are labels, dense, oracle."""
    assert LAY.int_names == ["user_id"] and LAY.list_offsets == {"tags": 1} and LAY.int_width == 3
    assert LAY.float_names == ["click", "price", "p"] and LAY.n_checked_floats == 2
    assert LAY.slots == {"user_id": 0, "tags": slice(1, 3)}
    assert LAY.columns == ["task_id", "is_query", "click", "price", "p", "user_id", "tags"]


def test_block_reorders_support_first_and_caps_counts():
    """Task 5's query row moves behind its support rows (stable); counts capped at S=2, Q=1; the
    rows past the caps, the tag past max_len, the truncated task are counted; hashed tags mod 5."""
    block, stats = build(ROWS, S=2, Q=1)
    np.testing.assert_array_equal(block.task_id, [5, 8])
    # row order after the reorder: 1, 2, 0 (task 5), then 3..7 (task 8); the last row is the pad
    # (the matrices are row-major [rows + 1, columns]; compared transposed, a column per feature)
    np.testing.assert_array_equal(block.ints.T, [[2, 3, 1, 4, 5, 6, 7, 8, -1],
                                               [-1, 1, 2, 4, 0, -1, 2, -1, -1],
                                               [-1, 2, -1, -1, 4, -1, -1, -1, -1]])
    np.testing.assert_array_equal(block.flts[:, 1], [1, 2, 0, 3, 4, 5, 6, 7, 0])   # price
    np.testing.assert_array_equal(block.flts[:, 0], [1, 0, 0, 1, 0, 1, 0, 1, 0])   # click = file row % 2
    np.testing.assert_array_equal(block.start_s, [0, 3])
    np.testing.assert_array_equal(block.cnt_s, [2, 2])
    np.testing.assert_array_equal(block.start_q, [2, 6])
    np.testing.assert_array_equal(block.cnt_q, [1, 1])
    assert block.tasks == 2 and block.rows == 8
    assert stats == {**dict.fromkeys(STAT_KEYS, 0), "rows_read": 8, "tasks_read": 2, "support_rows_dropped": 1,
                     "query_rows_dropped": 1, "truncated_tasks": 1, "list_values_dropped": 1}


def test_gather_pads_tasks_rows_and_lists():
    """Tasks [8, 5] into one batch of T=3 (the third slot a padding task) with S=3, Q=1: exact
    values, -1 / 0 padding of short sides, -1 padding of lists, masks."""
    block, stats = build(ROWS, S=3, Q=1)
    assert (stats["support_rows_dropped"], stats["query_rows_dropped"], stats["truncated_tasks"]) == (0, 1, 1)
    out = gather_tasks(block, np.array([1, 0]), n_batches=1, T=3, S=3, Q=1, lay=LAY)
    np.testing.assert_array_equal(out["task_id"], [[8, 5, -1]])
    np.testing.assert_array_equal(out["task_mask"], [[1, 1, 0]])
    sup, qry = out["support"], out["query"]
    np.testing.assert_array_equal(sup["user_id"], [[[4, 5, 6], [2, 3, -1], [-1, -1, -1]]])
    np.testing.assert_array_equal(sup["tags"], [[[[4, -1], [0, 4], [-1, -1]],
                                                 [[-1, -1], [1, 2], [-1, -1]],
                                                 [[-1, -1], [-1, -1], [-1, -1]]]])
    np.testing.assert_array_equal(sup["price"], [[[3, 4, 5], [1, 2, 0], [0, 0, 0]]])
    np.testing.assert_array_equal(sup["p"], [[[0.5, 0.5, 0.5], [0.5, 0.5, 0], [0, 0, 0]]])
    np.testing.assert_array_equal(sup["mask"], [[[1, 1, 1], [1, 1, 0], [0, 0, 0]]])
    np.testing.assert_array_equal(qry["user_id"], [[[7], [1], [-1]]])
    np.testing.assert_array_equal(qry["tags"], [[[[2, -1]], [[2, -1]], [[-1, -1]]]])  # 7 % 5 = 2
    np.testing.assert_array_equal(qry["price"], [[[6], [0], [0]]])
    np.testing.assert_array_equal(qry["click"], [[[0], [0], [0]]])
    np.testing.assert_array_equal(qry["mask"], [[[1], [1], [0]]])
    assert sup["tags"].dtype == np.int64 and sup["price"].dtype == np.float32 and out["task_mask"].dtype == np.float32
    assert set(sup) == {"user_id", "tags", "click", "price", "p", "mask"}


def test_tasks_without_support_or_query():
    """A task with only query rows and one with only support rows: counted, and that side is all
    padding in the batch."""
    rows = [(1, 1, 0, [], 0.0), (1, 1, 1, [], 1.0), (2, 0, 2, [3], 2.0)]
    block, stats = build(rows, S=2, Q=2)
    assert (stats["tasks_without_support"], stats["tasks_without_query"]) == (1, 1)
    out = gather_tasks(block, np.arange(2), n_batches=1, T=2, S=2, Q=2, lay=LAY)
    np.testing.assert_array_equal(out["support"]["mask"], [[[0, 0], [1, 0]]])
    np.testing.assert_array_equal(out["support"]["user_id"], [[[-1, -1], [2, -1]]])
    np.testing.assert_array_equal(out["query"]["mask"], [[[1, 1], [0, 0]]])
    np.testing.assert_array_equal(out["query"]["price"], [[[0, 1], [0, 0]]])


def test_several_batches_and_padding_only_chunks():
    """Three tasks as two batches of T=2 (the last slot padding); an empty block gives padding only."""
    more = [(11, 0, 9, [], 8.0), (11, 1, 0, [1], 9.0)]
    block, _ = build(ROWS + more, S=1, Q=1)
    out = gather_tasks(block, np.array([2, 0, 1]), n_batches=2, T=2, S=1, Q=1, lay=LAY)
    np.testing.assert_array_equal(out["task_id"], [[11, 5], [8, -1]])
    np.testing.assert_array_equal(out["support"]["user_id"], [[[9], [2]], [[4], [-1]]])
    np.testing.assert_array_equal(out["query"]["tags"][..., 0], [[[1], [7 % 5]], [[2], [-1]]])
    second = batch_of(out, 1)
    assert second["task_id"].tolist() == [8, -1] and second["support"]["mask"].shape == (2, 1)
    pad = gather_tasks(empty_block(LAY), np.zeros(0, np.int64), n_batches=2, T=2, S=2, Q=1, lay=LAY)
    assert (pad["task_id"] == -1).all() and not pad["task_mask"].any()
    assert (pad["support"]["tags"] == -1).all() and pad["support"]["tags"].shape == (2, 2, 2, 2)
    assert not pad["query"]["price"].any() and not pad["query"]["mask"].any()


def test_concat_and_compact_keep_what_gather_sees():
    """Block.concat shifts the second block's row starts; compact keeps only the chosen tasks'
    used rows; gathering from either equals gathering from the original."""
    a, _ = build(ROWS, S=2, Q=1)
    b, _ = build([(11, 0, 9, [], 8.0), (11, 1, 0, [1], 9.0)], S=2, Q=1)
    pool = Block.concat([a, b])
    np.testing.assert_array_equal(pool.task_id, [5, 8, 11])
    np.testing.assert_array_equal(pool.start_s, [0, 3, 8])
    np.testing.assert_array_equal(pool.start_q, [2, 6, 9])
    assert pool.rows == 10 and (pool.ints[-1] == -1).all() and (pool.flts[-1] == 0).all()
    small = compact(pool, np.array([2, 1]))
    np.testing.assert_array_equal(small.task_id, [11, 8])
    # used rows only: support of 11, support of 8 (2 of 3), then query of 11, query of 8 (1 of 2)
    np.testing.assert_array_equal(small.ints[:, 0], [9, 4, 5, 0, 7, -1])
    np.testing.assert_array_equal(small.start_s, [0, 1])
    np.testing.assert_array_equal(small.start_q, [3, 4])
    for got in (gather_tasks(small, np.arange(2), 1, 2, 2, 1, LAY),
                gather_tasks(pool, np.array([2, 1]), 1, 2, 2, 1, LAY)):
        np.testing.assert_array_equal(got["support"]["user_id"], [[[9, -1], [4, 5]]])
        np.testing.assert_array_equal(got["query"]["price"], [[[9], [6]]])


def test_bad_stripe_names_stripe_and_column():
    rows = [(1, 0, 0, [], 0.0), (2, 0, 1, [], 1.0), (1, 1, 2, [], 2.0)]
    with pytest.raises(DataError) as e:
        build(rows, S=2, Q=2)
    assert (e.value.file, e.value.stripe, e.value.column) == ("f.orc", 3, "task_id")
    assert "not contiguous" in str(e.value)
    with pytest.raises(DataError) as e:
        build([(1, 0, 10, [], 0.0)], S=2, Q=2)
    assert e.value.column == "user_id" and ">= the table's num_rows 10" in str(e.value)
