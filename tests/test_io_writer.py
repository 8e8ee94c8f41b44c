"""TaskWriter: stripe layout, exact schema, _index.json, and refusal of data that breaks the rules."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from io_data import make_table, tiny_schema, write_tiny  # noqa: E402

from gmeta.io.errors import DataError  # noqa: E402
from gmeta.io.validate import arrow_schema  # noqa: E402
from gmeta.io.writer import INDEX_FILE, TaskWriter, compression_block_size, write_dataset  # noqa: E402


def read_stripes(split_dir):
    """{file name: [stripe tables]} of every ORC file in a split directory."""
    out = {}
    for name in sorted(os.listdir(split_dir)):
        if name.endswith(".orc"):
            f = orc.ORCFile(os.path.join(split_dir, name))
            out[name] = [pa.Table.from_batches([f.read_stripe(i)]) for i in range(f.nstripes)]
    return out


@pytest.mark.parametrize("compression", ["zstd", "uncompressed"])
def test_roundtrip_layout_schema_and_index(tmp_path, compression):
    """Every task sits in one stripe, files carry the exact schema, values survive, the index is true."""
    schema = write_tiny(tmp_path, n_tasks=60, rows_per_stripe=40, rows_per_file=120, compression=compression)
    split = tmp_path / "train"
    stripes = read_stripes(split)
    assert len(stripes) >= 3, "rows_per_file=120 must roll over to several files"
    seen = []
    for name, tables in stripes.items():
        assert orc.ORCFile(str(split / name)).schema.equals(arrow_schema(schema))
        for t in tables:
            assert t.num_rows <= 40  # no single task here is longer than a stripe
            ids = t.column("task_id").to_numpy()
            runs = ids[np.r_[True, ids[1:] != ids[:-1]]]
            assert len(set(runs)) == runs.size, "a task is split inside a stripe"
            seen.append(runs)
    all_runs = np.concatenate(seen)
    assert np.array_equal(all_runs, np.arange(60)), "tasks split across stripes/files, lost or reordered"
    data = pa.concat_tables([t for ts in stripes.values() for t in ts])
    assert data.equals(make_table(np.arange(60)).cast(arrow_schema(schema)))

    index = json.loads((split / INDEX_FILE).read_text())
    assert index["rows"] == data.num_rows and index["tasks"] == 60
    assert [f["name"] for f in index["files"]] == list(stripes)
    for f in index["files"]:
        assert f["bytes"] == (split / f["name"]).stat().st_size
        real = stripes[f["name"]]
        assert [s["rows"] for s in f["stripes"]] == [t.num_rows for t in real]
        for s, t in zip(f["stripes"], real):
            ids = t.column("task_id").to_numpy()
            q = t.column("is_query").to_numpy()
            assert (s["first_task"], s["last_task"]) == (ids[0], ids[-1])
            assert s["tasks"] == np.unique(ids).size
            assert (s["support_rows"], s["query_rows"]) == (int((q == 0).sum()), int((q == 1).sum()))
    assert not [n for n in os.listdir(split) if n.startswith(".")], "temporary files left behind"


def test_each_buffer_is_one_stripe_with_compression(tmp_path):
    """The scaled compression block makes a full stripe buffer one stripe even with zstd."""
    assert compression_block_size(65536) == 65536 and compression_block_size(40) == 64
    write_tiny(tmp_path, n_tasks=200, rows_per_stripe=200, rows_per_file=10**6, compression="zstd")
    (tables,) = read_stripes(tmp_path / "train").values()
    sizes = [t.num_rows for t in tables]
    assert len(sizes) >= 4 and max(sizes) <= 200 and min(sizes[:-1]) >= 150, sizes


def test_task_longer_than_a_stripe_gets_its_own_stripe(tmp_path):
    """A task bigger than rows_per_stripe (and than the writer's batch size) is not split."""
    schema = tiny_schema()
    big = pa.concat_tables([make_table([4])] * 30)  # 30 copies of task 4's rows: one long task
    with TaskWriter(str(tmp_path), schema, rows_per_stripe=16) as w:
        w.write(make_table([1, 2, 3]))
        w.write(big)
        w.write(make_table([5, 6]))
    tables = [t for ts in read_stripes(tmp_path / "train").values() for t in ts]
    holders = [t for t in tables if 4 in set(t.column("task_id").to_pylist())]
    assert len(holders) == 1 and holders[0].num_rows == big.num_rows
    assert sum(t.num_rows for t in tables) == big.num_rows + make_table([1, 2, 3, 5, 6]).num_rows


def test_casts_to_canonical_types(tmp_path):
    """int32 ids, int64 flags and float64 floats are stored as int64 / int8 / float32."""
    schema = tiny_schema()
    t = make_table(np.arange(5))
    loose = t.set_column(t.schema.get_field_index("item_id"), "item_id", t.column("item_id").cast(pa.int32()))
    loose = loose.set_column(loose.schema.get_field_index("price"), "price", loose.column("price").cast(pa.float64()))
    loose = loose.set_column(1, "is_query", loose.column("is_query").cast(pa.int64()))
    with TaskWriter(str(tmp_path), schema, rows_per_stripe=100) as w:
        w.write(loose.select(list(reversed(loose.column_names))))  # any column order
    f = orc.ORCFile(str(tmp_path / "train" / "part-00000.orc"))
    assert f.schema.equals(arrow_schema(schema))
    assert f.read().equals(t.cast(arrow_schema(schema)))


def _with(table, name, values):
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def _set(name, head=(), tail=()):
    """A change of ``name``: ``head`` values first, ``tail`` values last, zeros between."""
    return lambda t: _with(t, name, np.r_[head, np.zeros(t.num_rows - len(head) - len(tail)), tail])


# (breakage, column the error must name, text it must hold); None: the task is split over two calls
BAD_TABLES = {
    "split_across_calls": (None, "task_id", "already written by an earlier write() call"),
    "non_contiguous": (lambda t: pa.concat_tables([t, make_table([0])]), "task_id", "not contiguous"),
    "nan_label": (_set("click", head=[np.nan]), "click", "non-finite"),
    "inf_dense": (_set("price", tail=[np.inf]), "price", "non-finite"),
    "click_of_3": (_set("click", tail=[3.0]), "click", "a click label must be in [0, 1]"),
    "negative_id": (_set("item_id", head=[3, -2]), "item_id", "negative id"),
    "negative_task": (_set("task_id", tail=[-5]), "task_id", "negative task id"),
    "id_too_large": (_set("item_id", tail=[50]), "item_id", ">= the table's num_rows 50"),
    "bad_flag": (_set("is_query", tail=[2]), "is_query", "must be 0 (support) or 1 (query)"),
    "missing_column": (lambda t: t.drop_columns(["price"]), "price", "missing"),
    "extra_column": (lambda t: t.append_column("bogus", pa.array(np.zeros(t.num_rows))), "bogus", "not in schema.json"),
    "null": (lambda t: t.set_column(2, "click", pa.array([None] + [0.0] * (t.num_rows - 1), pa.float32())),
             "click", "null"),
    "uncastable": (lambda t: t.set_column(t.schema.get_field_index("price"), "price", pa.array(["x"] * t.num_rows)),
                   "price", "cannot store"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_rejects_bad_tables(tmp_path, case):
    """Each broken table raises a DataError naming the column; nothing broken reaches a file."""
    bad, column, needle = BAD_TABLES[case]
    w = TaskWriter(str(tmp_path), tiny_schema(), rows_per_stripe=100)
    if bad is None:
        w.write(make_table([0, 1]))
        with pytest.raises(DataError) as err:
            w.write(make_table([1, 2]))
    else:
        with pytest.raises(DataError) as err:
            w.write(bad(make_table(np.arange(3))))
    assert needle in str(err.value) and err.value.column == column, str(err.value)
    assert "write() call" in str(err.value)
    w.abort()


def test_hashed_table_accepts_large_ids(tmp_path):
    """Ids past num_rows are fine for a hashed table (the reader takes them modulo num_rows)."""
    write_tiny(tmp_path, n_tasks=30)  # tags hold ids up to 11 * 29 + 2 with only 7 buckets
    assert (tmp_path / "train" / INDEX_FILE).exists()


def test_refuses_existing_data_and_other_schema(tmp_path):
    """A split that already holds ORC files, or a different schema.json, is an error, not a merge."""
    write_tiny(tmp_path, n_tasks=10)
    with pytest.raises(DataError, match="overwrite=True"):
        TaskWriter(str(tmp_path), tiny_schema(), split="train")
    with TaskWriter(str(tmp_path), tiny_schema(), split="train", overwrite=True) as w:
        w.write(make_table([100, 101]))
    index = json.loads((tmp_path / "train" / INDEX_FILE).read_text())
    assert index["tasks"] == 2 and len(index["files"]) == 1
    other = tiny_schema(splits=("train", "user_cold"))
    with pytest.raises(DataError, match="different schema.json"):
        TaskWriter(str(tmp_path), other, split="user_cold")
    with pytest.raises(ValueError, match="not listed in the schema's splits"):
        TaskWriter(str(tmp_path / "x"), tiny_schema(), split="user_cold")


def test_exception_inside_with_leaves_no_index_or_temp(tmp_path):
    """A failed write aborts: no _index.json, no temporary file; finished files stay readable."""
    schema = tiny_schema()
    with pytest.raises(RuntimeError):
        with TaskWriter(str(tmp_path), schema, rows_per_stripe=20, rows_per_file=40) as w:
            w.write(make_table(np.arange(20)))
            raise RuntimeError("generator died")
    names = os.listdir(tmp_path / "train")
    assert INDEX_FILE not in names and not [n for n in names if n.startswith(".")]
    assert names, "finished files should remain"
    for n in names:
        assert orc.ORCFile(str(tmp_path / "train" / n)).nrows > 0


def test_write_dataset_writes_splits_then_schema(tmp_path):
    """write_dataset: every split plus schema.json; returns the indexes."""
    schema = tiny_schema(splits=("train", "user_cold"))
    indexes = write_dataset(str(tmp_path), schema, {"train": make_table(np.arange(10)),
                                                    "user_cold": [make_table([20, 21]), make_table([22])]},
                            rows_per_stripe=16)
    assert indexes["train"]["tasks"] == 10 and indexes["user_cold"]["tasks"] == 3
    assert json.loads((tmp_path / "schema.json").read_text())["splits"] == ["train", "user_cold"]
