"""Bad data on the read path: real broken ORC files (written with pyarrow directly, bypassing the
writer) must raise gmeta.io.errors.DataError naming the file, stripe and column."""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from io_data import make_table, tiny_schema, write_tiny  # noqa: E402

from gmeta.io.errors import DataError  # noqa: E402
from gmeta.io.reader import MetaReader  # noqa: E402


def raw_dataset(root: Path, files: dict, schema=None) -> str:
    """Write ``{name: [stripe tables]}`` as ORC files (uncompressed, stripe_size=1: one write =
    one stripe) under root/train, plus schema.json."""
    split = root / "train"
    split.mkdir(parents=True, exist_ok=True)
    for name, stripes in files.items():
        with orc.ORCWriter(str(split / name), stripe_size=1, batch_size=4096, compression="uncompressed") as w:
            for t in stripes:
                w.write(t)
    (schema or tiny_schema()).save(str(root))
    return str(root)


def with_column(table, name, values, type_=None):
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, type_ or table.schema.field(name).type))


def read_all(data, **kw):
    r = MetaReader(data, tasks_per_batch=4, support_size=4, query_size=2, **kw)
    return list(r.numpy_batches(0))


def expect(exc_info, file=None, stripe=None, column=None, text=None):
    e = exc_info.value
    assert isinstance(e, ValueError)
    msg = str(e)
    if file is not None:
        assert e.file is not None and e.file.endswith(file) and file in msg, msg
    if stripe is not None:
        assert e.stripe == stripe and f"stripe {stripe}" in msg, msg
    if column is not None:
        assert e.column == column and repr(column) in msg, msg
    if text is not None:
        assert text in msg, msg


def test_dtype_mismatch(tmp_path):
    t = make_table(np.arange(4))
    t = with_column(t, "click", t.column("click").to_numpy().astype(np.float64), pa.float64())
    data = raw_dataset(tmp_path, {"a.orc": [t]})
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="a.orc", column="click", text="does not match schema.json")


def test_missing_column(tmp_path):
    data = raw_dataset(tmp_path, {"a.orc": [make_table(np.arange(4)).drop_columns(["price"])]})
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="a.orc", column="price", text="missing")


@pytest.mark.parametrize("column, values, text", [
    ("item_id", lambda n: np.r_[1, 2, -3, np.zeros(n - 3, int)], "negative id -3 at row 2"),
    ("item_id", lambda n: np.r_[np.zeros(n - 1, int), 50], ">= the table's num_rows 50"),
    ("click", lambda n: np.r_[np.zeros(n - 1), np.nan], "non-finite value nan"),
    ("price", lambda n: np.r_[np.inf, np.zeros(n - 1)], "non-finite value inf"),
    ("click", lambda n: np.r_[np.zeros(n - 1), 3.0], "value 3 at row"),
    ("click", lambda n: np.r_[-1.0, np.zeros(n - 1)], "a click label must be in [0, 1]"),
])
def test_bad_values_in_second_stripe(tmp_path, column, values, text):
    """Value checks run per stripe while reading; the error points at stripe 1 of b.orc."""
    good, bad = make_table(np.arange(0, 4)), make_table(np.arange(4, 8))
    bad = with_column(bad, column, values(bad.num_rows))
    data = raw_dataset(tmp_path, {"a.orc": [make_table(np.arange(10, 14))], "b.orc": [good, bad]})
    with pytest.raises(DataError) as e:
        read_all(data, shuffle=False)
    expect(e, file="b.orc", stripe=1, column=column, text=text)


@pytest.mark.parametrize("column, values, text, when", [
    ("item_id", lambda n: [None] + [1] * (n - 1), "null", "read"),
    ("is_query", lambda n: np.r_[np.zeros(n - 1, int), 3], "must be 0 (support) or 1 (query)", "plan"),
    ("task_id", lambda n: np.full(n, -4), "negative task id -4", "plan"),
], ids=["null", "bad_query_flag", "negative_task_id"])
def test_bad_values_in_only_stripe(tmp_path, column, values, text, when):
    """Task and flag columns are checked when the plan is made (they are all the scan reads),
    other columns while reading."""
    t = make_table(np.arange(4))
    data = raw_dataset(tmp_path, {"a.orc": [with_column(t, column, values(t.num_rows))]})
    with pytest.raises(DataError) as e:
        (MetaReader if when == "plan" else read_all)(data)
    expect(e, file="a.orc", stripe=0, column=column, text=text)


def test_task_split_across_stripes(tmp_path):
    t = make_table(np.arange(4))
    first, second = t.slice(0, t.num_rows - 2), t.slice(t.num_rows - 2)  # task 3 straddles stripes
    data = raw_dataset(tmp_path, {"a.orc": [first, second]})
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="a.orc", stripe=1, column="task_id", text="task 3 is split across stripes")


def test_task_split_across_files(tmp_path):
    data = raw_dataset(tmp_path, {"a.orc": [make_table([1, 2])], "b.orc": [make_table([5, 2])]})
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="b.orc", stripe=0, column="task_id", text="task 2 is split across stripes")
    assert "a.orc stripe 0" in str(e.value)


def test_task_not_contiguous_inside_stripe(tmp_path):
    data = raw_dataset(tmp_path, {"a.orc": [pa.concat_tables([make_table([1, 2]), make_table([1])])]})
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="a.orc", stripe=0, column="task_id", text="task 1 is not contiguous")


def test_empty_files(tmp_path):
    data = raw_dataset(tmp_path, {"a.orc": [make_table([0])]})
    (tmp_path / "train" / "b.orc").write_bytes(b"")
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="b.orc", text="empty file (0 bytes)")
    (tmp_path / "train" / "b.orc").unlink()
    orc.write_table(make_table([0]).slice(0, 0), str(tmp_path / "train" / "c.orc"))
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="c.orc", text="empty file: no rows")


def test_truncated_and_garbage_files(tmp_path):
    data = raw_dataset(tmp_path, {"a.orc": [make_table(np.arange(5))]})
    path = tmp_path / "train" / "a.orc"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="a.orc", text="truncated or corrupt")
    path.write_bytes(b"this is not an ORC file at all" * 10)
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="a.orc", text="truncated or corrupt")


def test_no_orc_files(tmp_path):
    data = raw_dataset(tmp_path, {})
    (tmp_path / "train" / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError) as e:
        MetaReader(data)
    expect(e, file="train", text="no ORC files")


def test_nonexistent_paths_and_missing_schema(tmp_path):
    with pytest.raises(DataError, match="schema file not found"):
        MetaReader(str(tmp_path / "nowhere"))
    write_tiny(tmp_path / "d", n_tasks=5)
    with pytest.raises(DataError) as e:
        MetaReader(str(tmp_path / "d"), split="user_cold")
    expect(e, file="user_cold", text="split directory does not exist")
    (tmp_path / "d" / "schema.json").unlink()
    with pytest.raises(DataError, match="schema.json: schema file not found"):
        MetaReader(str(tmp_path / "d"))


def test_error_surfaces_through_tf_data(tmp_path):
    """A read-time DataError stops tf.data with its message, and is kept in reader.error."""
    import tensorflow as tf

    bad = make_table(np.arange(4))
    bad = with_column(bad, "price", np.r_[np.nan, np.zeros(bad.num_rows - 1)])
    data = raw_dataset(tmp_path, {"a.orc": [bad]})
    r = MetaReader(data, tasks_per_batch=2, support_size=4, query_size=2)
    with pytest.raises(tf.errors.OpError, match="a.orc: stripe 0: column 'price': non-finite"):
        list(r.dataset(0))
    assert isinstance(r.error, DataError) and r.error.column == "price"


def test_hashed_ids_are_reduced_modulo_buckets(tmp_path):
    """Ids of a hashed table are taken modulo num_rows (here 7 buckets)."""
    t = make_table([3])  # tags of task 3: 33, 34, ... (7 buckets)
    data = raw_dataset(tmp_path, {"a.orc": [t]})
    b = read_all(data)[0]
    tags = b["support"]["tags"][0]
    assert tags[1].tolist() == [33 % 7, -1, -1] and tags[3].tolist() == [33 % 7, 34 % 7, 35 % 7]
