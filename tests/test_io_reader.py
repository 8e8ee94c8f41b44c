"""MetaReader: batch contents against a per-task reference, shapes, caps, shuffling, tf.data."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.orc as orc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from io_data import expected_task, make_table, tiny_schema, write_tiny  # noqa: E402

from gmeta.cli import main as gmeta_main  # noqa: E402
from gmeta.io.reader import MetaReader  # noqa: E402
from gmeta.io.writer import INDEX_FILE, TaskWriter, write_dataset_schema  # noqa: E402

FEATURES = ("user_id", "item_id", "tags", "click", "price", "p_click", "mask")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_tiny(d, n_tasks=60, rows_per_stripe=40, rows_per_file=120)
    return str(d)


def delivered(reader, epoch=0):
    """{task id: {side: {feature: array}}} of every real task, plus the batch count."""
    out, n = {}, 0
    for b in reader.numpy_batches(epoch):
        n += 1
        for i in np.flatnonzero(b["task_mask"] > 0):
            t = int(b["task_id"][i])
            assert t not in out, f"task {t} delivered twice"
            out[t] = {side: {k: b[side][k][i] for k in FEATURES} for side in ("support", "query")}
    return out, n


@pytest.mark.parametrize("S, Q", [(8, 4), (3, 1)])
def test_batches_match_reference(data, S, Q):
    """Every task's padded support/query arrays equal the per-task reference (caps, -1 / 0 padding,
    list padding and truncation, hashed ids modulo num_rows)."""
    r = MetaReader(data, tasks_per_batch=4, support_size=S, query_size=Q, shuffle=True, seed=3)
    got, n = delivered(r)
    assert n == r.steps_per_epoch == 15
    assert sorted(got) == list(range(60))
    for t, sides in got.items():
        want = expected_task(t, S, Q)
        for side in ("support", "query"):
            for k in FEATURES:
                np.testing.assert_array_equal(sides[side][k], want[side][k], err_msg=f"task {t} {side} {k}")


def test_truncation_is_counted(data):
    """Rows past the caps are dropped and counted in reader.stats."""
    S, Q = 3, 1
    r = MetaReader(data, tasks_per_batch=4, support_size=S, query_size=Q)
    list(r.numpy_batches(0))
    tasks = np.arange(60)
    n_sup, n_qry = 2 + tasks % 5, 1 + tasks % 3
    assert r.stats["support_rows_dropped"] == int(np.maximum(n_sup - S, 0).sum())
    assert r.stats["query_rows_dropped"] == int(np.maximum(n_qry - Q, 0).sum())
    assert r.stats["truncated_tasks"] == int(((n_sup > S) | (n_qry > Q)).sum())
    assert r.stats["rows_read"] == int((n_sup + n_qry).sum()) and r.stats["tasks_read"] == 60
    # tags hold pos % 4 values; values past max_len=3 are dropped
    assert r.stats["list_values_dropped"] == int(sum(max(0, p % 4 - 3) for n in n_sup + n_qry for p in range(n)))
    assert r.stats["batches"] == 15 and r.stats["padding_tasks"] == 0



def test_input_statistics_count_each_epoch_once(data):
    """The training loop reads epochs as one prefetched stream, so epoch 1 is being read while
    epoch 0's last batches train; each epoch's statistics must still count that epoch alone."""
    from gmeta.trainer.run.loop import all_epochs

    r = MetaReader(data, tasks_per_batch=4, support_size=3, query_size=1, seed=1)
    stream = iter(all_epochs(r, epochs=3))
    for _ in range(r.steps_per_epoch + 2):  # all of epoch 0, two batches of epoch 1 (and read-ahead)
        next(stream)
    one_epoch = {"tasks_read": 60, "batches": 15, "padding_tasks": 0}
    assert {k: r.epoch_stats(0)[k] for k in one_epoch} == one_epoch
    assert r.stats["tasks_read"] > 60  # the cumulative count already holds read-ahead
    for _ in stream:
        pass
    assert all({k: r.epoch_stats(e)[k] for k in one_epoch} == one_epoch for e in range(3))


def test_shapes_and_padding_of_last_batch(data):
    """Static [T, S] / [T, S, L] shapes; a partial last batch is padded with task_mask 0, id -1."""
    r = MetaReader(data, tasks_per_batch=7, support_size=5, query_size=2, shuffle=False)
    batches = list(r.numpy_batches(0))
    assert len(batches) == r.steps_per_epoch == 9  # ceil(60 / 7)
    for b in batches:
        assert b["task_id"].shape == (7,) and b["task_mask"].dtype == np.float32
        assert b["support"]["tags"].shape == (7, 5, 3) and b["support"]["tags"].dtype == np.int64
        assert b["query"]["price"].shape == (7, 2) and b["query"]["price"].dtype == np.float32
        assert b["support"]["mask"].shape == (7, 5)
    last = batches[-1]
    assert last["task_mask"].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert last["task_id"][4:].tolist() == [-1, -1, -1]
    assert (last["support"]["mask"][4:] == 0).all() and (last["support"]["item_id"][4:] == -1).all()
    assert r.stats["padding_tasks"] == 3


def test_shuffle_is_deterministic_and_changes_per_epoch(data):
    """shuffle=False keeps file order; seed and epoch fix the shuffled order."""
    def order(**kw):
        r = MetaReader(data, tasks_per_batch=4, support_size=4, query_size=2, **kw)
        return [int(t) for b in r.numpy_batches(0) for t in b["task_id"]]

    assert order(shuffle=False) == list(range(60))
    a0 = order(shuffle=True, seed=1)
    assert a0 == order(shuffle=True, seed=1)
    assert sorted(a0) == list(range(60)) and a0 != list(range(60))
    r = MetaReader(data, tasks_per_batch=4, support_size=4, query_size=2, shuffle=True, seed=1)
    a1 = [int(t) for b in r.numpy_batches(1) for t in b["task_id"]]
    assert sorted(a1) == list(range(60)) and a1 != a0
    assert order(shuffle=True, seed=2) != a0


def test_tf_dataset_equals_numpy_batches(data):
    """reader.dataset(): static element spec, cardinality = steps, same values as numpy_batches."""
    import tensorflow as tf

    r = MetaReader(data, tasks_per_batch=8, support_size=4, query_size=2, shuffle=True, seed=5)
    ds = r.dataset(epoch=2)
    assert int(ds.cardinality()) == r.steps_per_epoch == 8
    spec = ds.element_spec
    assert spec["support"]["tags"].shape == (8, 4, 3) and spec["support"]["tags"].dtype == tf.int64
    assert spec["query"]["click"].shape == (8, 2) and spec["task_mask"].shape == (8,)
    ref = list(r.numpy_batches(2))
    got = list(ds.as_numpy_iterator())
    assert len(got) == len(ref)
    for g, w in zip(got, ref):
        np.testing.assert_array_equal(g["task_id"], w["task_id"])
        for side in ("support", "query"):
            for k in FEATURES:
                np.testing.assert_array_equal(g[side][k], w[side][k])


def test_epochs_in_one_pipeline_equal_each_epochs_own(data):
    """dataset(epoch, epochs=n): cardinality n x steps, and each epoch's batches are those of
    that epoch's own dataset (the epoch number is a tensor in the pipeline, not baked in)."""
    r = MetaReader(data, tasks_per_batch=8, support_size=4, query_size=2, shuffle=True, seed=5)
    ds = r.dataset(epoch=1, packed=True, epochs=3)
    assert int(ds.cardinality()) == 3 * r.steps_per_epoch
    got = list(ds.as_numpy_iterator())
    want = [b for e in (1, 2, 3) for b in r.dataset(epoch=e, packed=True).as_numpy_iterator()]
    assert len(got) == len(want) == 3 * r.steps_per_epoch
    for g, w in zip(got, want):
        for side in ("support", "query"):
            for k in ("ints", "floats", "mask"):
                np.testing.assert_array_equal(g[side][k], w[side][k])
        np.testing.assert_array_equal(g["task_id"], w["task_id"])
    orders = [[int(t) for b in got[i:i + r.steps_per_epoch] for t in b["task_id"]]
              for i in range(0, len(got), r.steps_per_epoch)]
    assert orders[0] != orders[1] != orders[2]  # each epoch its own shuffle
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        r.dataset(epoch=0, epochs=0)


def test_packed_dataset_equals_numpy_and_unpacks_to_the_dicts(tmp_path):
    """dataset(packed=True): [T, cap, columns] arrays equal to numpy_batches(packed=True) value for
    value, and unpack() of each equals the dict batch; neither a pass left unfinished nor two
    iterators read side by side disturb each other; the pools TensorFlow takes over are aligned."""
    import tensorflow as tf

    from gmeta.io.assemble import ALIGN

    write_tiny(tmp_path, n_tasks=700, rows_per_stripe=200, rows_per_file=900, tasks_per_write=50)
    # pools of 256 tasks (pool_cut_tasks at T=8), each handed over as windows of up to 16 batches
    r = MetaReader(str(tmp_path), tasks_per_batch=8, support_size=4, query_size=2, shuffle=True, seed=5,
                   shuffle_buffer_tasks=16)
    r.batches_per_window = 16
    packed = r.dataset(epoch=1, packed=True)
    spec = packed.element_spec
    assert spec["support"]["ints"].shape == (8, 4, r._layout.int_width)
    assert spec["query"]["floats"].shape == (8, 2, len(r._layout.float_names))
    next(iter(packed))  # an unfinished pass
    got = list(packed.as_numpy_iterator())
    # two iterators read side by side: each its own pass, the same batches
    for x, y in zip(iter(packed), iter(packed)):
        tf.nest.map_structure(lambda u, v: np.testing.assert_array_equal(u.numpy(), v.numpy()), x, y)
    ref = list(r.numpy_batches(1, packed=True))
    dicts = list(r.dataset(epoch=1).as_numpy_iterator())
    assert len(got) == len(ref) == len(dicts) == r.steps_per_epoch
    for g, w, d in zip(got, ref, dicts):
        tf.nest.map_structure(np.testing.assert_array_equal, g, w)
        unpacked = tf.nest.map_structure(lambda t: t.numpy(), r.unpack(tf.nest.map_structure(tf.constant, g)))
        tf.nest.map_structure(np.testing.assert_array_equal, unpacked, d)
    pools = [pool for pool, _ in r.windows(1)]
    assert len(pools) == 6 and len({id(p) for p in pools}) == 3
    assert all(p.ints.ctypes.data % ALIGN == 0 and p.flts.ctypes.data % ALIGN == 0 for p in pools)


def test_query_rows_before_support_rows(tmp_path):
    """A file whose tasks list query rows first still splits support/query by the flag."""
    schema = tiny_schema()
    with TaskWriter(str(tmp_path), schema, rows_per_stripe=30) as w:
        w.write(make_table(np.arange(12), query_first=True))
    write_dataset_schema(str(tmp_path), schema)
    r = MetaReader(str(tmp_path), tasks_per_batch=4, support_size=6, query_size=3, shuffle=False)
    got, _ = delivered(r)
    for t in range(12):
        n_sup, n_qry = 2 + t % 5, 1 + t % 3
        item = (7 * t + np.arange(n_sup + n_qry)) % 50
        np.testing.assert_array_equal(got[t]["query"]["item_id"][:n_qry], item[:n_qry])
        np.testing.assert_array_equal(got[t]["support"]["item_id"][:n_sup], item[n_qry:])
        assert got[t]["support"]["mask"].sum() == n_sup and got[t]["query"]["mask"].sum() == n_qry


def test_scan_plan_equals_index_plan_and_stale_index_is_ignored(tmp_path):
    """Without (or with a stale) _index.json the reader scans the stripes and gets the same plan."""
    write_tiny(tmp_path, n_tasks=40, rows_per_stripe=30, rows_per_file=90)
    with_index = MetaReader(str(tmp_path), tasks_per_batch=4).units
    scanned = MetaReader(str(tmp_path), tasks_per_batch=4, use_index=False).units
    assert with_index == scanned and len(scanned) > 3
    split = tmp_path / "train"
    index = json.loads((split / INDEX_FILE).read_text())
    index["files"][0]["bytes"] += 1  # as if the file had been rewritten
    (split / INDEX_FILE).write_text(json.dumps(index))
    assert MetaReader(str(tmp_path), tasks_per_batch=4).units == scanned
    os.remove(split / INDEX_FILE)
    assert MetaReader(str(tmp_path), tasks_per_batch=4).units == scanned


def test_units_are_stripes(data):
    """Plan units are exactly the (file, stripe) pairs of the files."""
    r = MetaReader(data, tasks_per_batch=4)
    files = sorted({u.file for u in r.units})
    pairs = [(f, i) for f in files for i in range(orc.ORCFile(f).nstripes)]
    assert [(u.file, u.stripe) for u in r.units] == pairs
    assert sum(u.tasks for u in r.units) == 60


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank=2"):
        MetaReader("unused", rank=2, world_size=2)
    with pytest.raises(ValueError, match="tasks_per_batch=0"):
        MetaReader("unused", tasks_per_batch=0)


def test_bench_io_json(capsys):
    """``gmeta bench io --json`` on a small generated dataset: stdout is one JSON line with rates."""
    from conftest import REPO, last_json, run_gmeta

    proc = run_gmeta("bench", "io", "--json", "--rows", "50000", "--repeat", "1", "--rows-per-stripe", "8192",
                     cwd=REPO, timeout=240)
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    res = last_json(proc)
    assert res["raw_rows_per_s"] > 0 and res["reader_rows_per_s"] > 0 and res["ratio"] > 0
    assert res["rows_delivered"] == res["rows_in_files"] >= 50000 * 0.9
    assert res["batches"] == res["steps_per_epoch"] and res["stripes"] >= 6
    stages = res["stages_ms_per_1m_rows"]
    assert set(stages) == {"decode", "blocks", "pool", "tensorflow", "loop"} and all(v > 0 for v in stages.values())
    # a misspelled flag of a bench is reported by that bench's command line, with the closest flag
    with pytest.raises(SystemExit) as exc:
        gmeta_main(["bench", "io", "--row", "5"])  # no abbreviations either
    assert exc.value.code == 2 and capsys.readouterr().err == (
        "gmeta bench io: unknown flag --row (did you mean --rows?); see gmeta bench io --help\n")
