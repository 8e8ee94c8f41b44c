"""The planning layer (gmeta.io.plan / gmeta.io.index): per-task sizes from the index or a scan,
whole-split column reads, the one stripe scanner, and the compact index text."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from io_data import make_columns, make_table, task_sizes as reference_sizes, tiny_schema, write_tiny  # noqa: E402

from gmeta.io import plan  # noqa: E402
from gmeta.io.errors import DataError  # noqa: E402
from gmeta.io.index import INDEX_FILE, index_text, scan_file  # noqa: E402
from gmeta.io.plan import distinct_values, read_columns, task_sizes  # noqa: E402

N_TASKS = 60


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    write_tiny(d, n_tasks=N_TASKS, rows_per_stripe=40, rows_per_file=120)
    return d


def copy_of(data, tmp_path):
    import shutil

    shutil.copytree(data, tmp_path / "d")
    return tmp_path / "d"


def pairs(support, query):
    return sorted(zip(support.tolist(), query.tolist()))


def count_scans(monkeypatch):
    calls = []
    real = plan.scan_file
    monkeypatch.setattr(plan, "scan_file", lambda path, schema: calls.append(path) or real(path, schema))
    return calls


def test_task_sizes_from_index_without_reading_data(data, monkeypatch):
    """Every task's support/query counts, from _index.json alone; same arrays as a scan."""
    calls = count_scans(monkeypatch)
    support, query = task_sizes(str(data), "train")
    assert calls == [] and support.dtype == query.dtype == np.int64
    want_s, want_q = reference_sizes(np.arange(N_TASKS))
    assert pairs(support, query) == pairs(want_s, want_q)
    scanned = task_sizes(str(data), "train", use_index=False)
    assert len(calls) == len(list((data / "train").glob("*.orc")))
    np.testing.assert_array_equal(scanned[0], support)
    np.testing.assert_array_equal(scanned[1], query)


def test_index_without_task_sizes_is_still_valid(data, tmp_path, monkeypatch):
    """An index written before task_sizes existed: the reader still plans from it, task_sizes scans."""
    from gmeta.io.reader import MetaReader

    d = copy_of(data, tmp_path)
    index_path = d / "train" / INDEX_FILE
    index = json.loads(index_path.read_text())
    for f in index["files"]:
        for s in f["stripes"]:
            del s["task_sizes"]
    index_path.write_text(json.dumps(index, indent=1, sort_keys=True))
    with_index = task_sizes(str(data), "train")
    calls = count_scans(monkeypatch)
    old = task_sizes(str(d), "train")
    assert len(calls) == len(index["files"])
    np.testing.assert_array_equal(old[0], with_index[0])
    np.testing.assert_array_equal(old[1], with_index[1])
    calls.clear()
    units = MetaReader(str(d), tasks_per_batch=4).units
    assert calls == [] and [(u.rows, u.tasks) for u in units] == [(s["rows"], s["tasks"])
                                                                  for f in index["files"] for s in f["stripes"]]


def test_malformed_task_sizes_names_file_and_stripe(data, tmp_path):
    d = copy_of(data, tmp_path)
    index_path = d / "train" / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["files"][1]["stripes"][1]["task_sizes"][0][2] += 1   # counts no longer add up to the tasks
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError) as e:
        task_sizes(str(d), "train")
    assert e.value.file.endswith(index["files"][1]["name"]) and e.value.stripe == 1
    assert "task_sizes" in str(e.value)


def test_index_records_a_sorted_histogram_per_stripe(data):
    """Each stripe's task_sizes lists distinct (support, query) pairs in order; counts sum to its tasks."""
    index = json.loads((data / "train" / INDEX_FILE).read_text())
    for f in index["files"]:
        for s in f["stripes"]:
            hist = s["task_sizes"]
            keys = [(a, b) for a, b, _ in hist]
            assert keys == sorted(set(keys)) and sum(n for _, _, n in hist) == s["tasks"]
            assert sum(a * n for a, _, n in hist) == s["support_rows"]
            assert sum(b * n for _, b, n in hist) == s["query_rows"]


def test_writer_read_back_is_the_scanner(data):
    """The index the writer stored equals what the one stripe scanner computes from each file."""
    index = json.loads((data / "train" / INDEX_FILE).read_text())
    for f in index["files"]:
        entries, ids = scan_file(str(data / "train" / f["name"]), tiny_schema())
        assert entries == f["stripes"]
        assert [int(i[0]) for i in ids] == [s["first_task"] for s in f["stripes"]]


def test_index_text_is_json_with_a_line_per_stripe(data):
    text = (data / "train" / INDEX_FILE).read_text()
    index = json.loads(text)
    assert index_text(index) == text
    stripes = sum(len(f["stripes"]) for f in index["files"])
    assert len(text.splitlines()) == 2 + len(index["files"]) + stripes   # head, "files", file heads, stripes


def test_distinct_values(data):
    """Distinct ids over every row, list values flattened (raw, not reduced modulo the buckets)."""
    cols = make_columns(np.arange(N_TASKS))
    got = distinct_values(str(data), "train", "item_id")
    np.testing.assert_array_equal(got, np.unique(cols["item_id"]))
    assert got.dtype == np.int64
    tags = distinct_values(str(data), "train", "tags")
    np.testing.assert_array_equal(tags, np.unique(cols["tags"].flatten().to_numpy()))
    assert tags.max() > 7   # the table has 7 buckets: values are as stored


def raw_split(root: Path, tables) -> str:
    """ORC files written with pyarrow directly (no writer checks), one per table."""
    split = root / "train"
    split.mkdir(parents=True)
    for k, t in enumerate(tables):
        orc.write_table(t, str(split / f"f{k}.orc"))
    return str(root)


def test_distinct_values_drops_negatives_and_checks_the_column(tmp_path):
    t = pa.table({"task_id": pa.array([0, 0, 1], pa.int64()), "ids": pa.array([[3, -1], [], [5, 3]]),
                  "x": pa.array([-2, 4, 4], pa.int64()), "f": pa.array([1.0, 2.0, 3.0])})
    d = raw_split(tmp_path, [t, t.slice(1)])
    np.testing.assert_array_equal(distinct_values(d, "train", "ids"), [3, 5])
    np.testing.assert_array_equal(distinct_values(d, "train", "x"), [4])
    with pytest.raises(DataError) as e:
        distinct_values(d, "train", "f")
    assert e.value.file.endswith("f0.orc") and e.value.column == "f" and "int64 or list<int64>" in str(e.value)
    with pytest.raises(DataError) as e:
        distinct_values(d, "train", "nope")
    assert e.value.file.endswith("f0.orc") and e.value.column == "nope" and "missing" in str(e.value)


def test_read_columns_all_rows_in_file_order(data):
    got = read_columns(str(data), "train", ["price", "task_id", "is_query"])
    want = make_columns(np.arange(N_TASKS))
    assert list(got) == ["price", "task_id", "is_query"]
    for name, arr in got.items():
        np.testing.assert_array_equal(arr, want[name])
        assert arr.dtype == want[name].dtype
    assert read_columns(str(data), "train", []) == {}


def test_read_columns_errors_name_file_stripe_column(tmp_path):
    good = make_table([0, 1])
    nulls = good.set_column(good.schema.get_field_index("price"), "price",
                            pa.array([None] + [1.0] * (good.num_rows - 1), pa.float32()))
    d = raw_split(tmp_path, [good, good.drop_columns(["click"])])
    with pytest.raises(DataError) as e:
        read_columns(d, "train", ["price", "click"])
    assert e.value.file.endswith("f1.orc") and e.value.column == "click" and "missing" in str(e.value)
    with pytest.raises(DataError) as e:
        read_columns(d, "train", ["tags"])
    assert e.value.column == "tags" and "not a single-valued numeric type" in str(e.value)
    d = raw_split(tmp_path / "n", [good, nulls])
    with pytest.raises(DataError) as e:
        read_columns(d, "train", ["price"])
    assert (e.value.file.endswith("f1.orc"), e.value.stripe, e.value.column) == (True, 0, "price")
    with pytest.raises(DataError, match="split directory does not exist"):
        read_columns(d, "user_cold", ["price"])
