"""Tiered embeddings, the plan side: the id profile, the hot-set choice under a budget, the byte
model and the flags. (Equivalence of the tiered backend with the sharded one, for 1, 2 and 3
workers and every row optimizer: test_embedding.py, test_embedding_dist.py, test_distributed.py.)"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
from conftest import REPO, run_gmeta  # noqa: E402
from io_data import make_columns, write_tiny  # noqa: E402

from gmeta.io.errors import DataError  # noqa: E402
from gmeta.trainer.embedding.tiering import (  # noqa: E402
    TableProfile,
    choose_hot,
    choose_sync,
    expected_bytes,
    load_profile,
    parse_budget,
    profile_split,
    save_profile,
)

N_TASKS = 60


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_tiny(d, n_tasks=N_TASKS)
    return d


def _brute_counts(column, modulo=None):
    cols = make_columns(np.arange(N_TASKS))
    if column == "tags":
        values = cols["tags"].flatten().to_numpy()
    else:
        values = np.asarray(cols[column])
    values = values % modulo if modulo else values
    rows, counts = np.unique(values, return_counts=True)
    return dict(zip(rows.tolist(), counts.tolist()))


def test_profile_counts_every_lookup_of_every_table(tiny, tmp_path):
    """All rows sampled: counts equal a count of the generated columns (hashed tags modulo 7),
    most looked up first with ties by row id; saved and loaded back unchanged."""
    profiles = profile_split(str(tiny), "train", sample_rows=0)
    assert set(profiles) == {"user", "item", "tag"}
    for table, column, modulo in (("user", "user_id", None), ("item", "item_id", None), ("tag", "tags", 7)):
        p = profiles[table]
        assert dict(zip(p.rows.tolist(), p.counts.tolist())) == _brute_counts(column, modulo)
        order = np.lexsort((p.rows, -p.counts))
        assert (order == np.arange(p.rows.size)).all()
    out = save_profile(profiles, str(tmp_path / "prof"), {"split": "train"})
    back = load_profile(out, ["item", "tag"])
    np.testing.assert_array_equal(back["item"].rows, profiles["item"].rows)
    summary = json.loads((tmp_path / "prof" / "summary.json").read_text())
    item = summary["tables"]["item"]
    assert item["lookups"] == profiles["item"].lookups and item["distinct_rows"] == 50
    top = profiles["item"].counts[:5].sum() / profiles["item"].lookups  # 10% of 50 rows
    assert item["coverage"]["10.0%"] == pytest.approx(top, abs=1e-4)


def test_a_sample_reads_evenly_spaced_stripes(tiny):
    """--sample-rows below the split's rows reads fewer rows (whole stripes), still every table."""
    full = profile_split(str(tiny), "train", sample_rows=0)["item"].lookups
    part = profile_split(str(tiny), "train", sample_rows=100)["item"].lookups
    assert 0 < part < full


def test_broken_profiles_and_budgets_are_named(tmp_path):
    with pytest.raises(DataError, match="no profile of table item"):
        load_profile(str(tmp_path), ["item"])
    np.savez(tmp_path / "item.npz", rows=np.array([5, 99]), counts=np.array([3, 1]), num_rows=np.int64(50),
             lookups=np.int64(4))
    with pytest.raises(DataError, match="outside the table"):
        load_profile(str(tmp_path), ["item"])
    assert parse_budget("off") is None and parse_budget("auto") == -1
    assert parse_budget("64M") == 64 << 20 and parse_budget("1.5k") == 1536 and parse_budget("500") == 500
    for bad in ("lots", "0", "-3M"):
        with pytest.raises(ValueError, match="--tiering"):
            parse_budget(bad)


def _profile(name, num_rows, counts):
    rows = np.arange(len(counts), dtype=np.int64)
    order = np.lexsort((rows, -np.asarray(counts)))
    return TableProfile(name, num_rows, rows[order], np.asarray(counts, np.int64)[order])


def test_hot_rows_are_the_most_looked_up_under_the_budget():
    """Greedy over all tables by count (ties by table, then row), within bytes per worker and at
    most the share cap of each table; the same input gives the same set."""
    a = _profile("a", 1000, [50, 40, 1, 30])       # rows 0, 1, 3 lead
    b = _profile("b", 1000, [45, 0, 35])           # rows 0, 2
    dims = {"a": 4, "b": 4}
    row_bytes = 4 * 4 * 2  # dim x float32 x (value + one adagrad slot)
    hot = choose_hot({"a": a, "b": b}, dims, 3 * row_bytes, slots_per_row=1)
    assert hot["a"].tolist() == [0, 1] and hot["b"].tolist() == [0]  # 50, 45, 40
    hot = choose_hot({"a": a, "b": b}, dims, -1, slots_per_row=1, max_share=0.002)  # 2 rows each
    assert hot["a"].tolist() == [0, 1] and hot["b"].tolist() == [0, 2]
    assert choose_hot({"a": a}, dims, 0, 1)["a"].size == 0


def test_byte_model_says_replication_never_saves_wire_bytes_on_two_or_more_workers():
    """The model of tiering.py: the sparse sync ties with the AlltoAll at 2 workers and costs more
    beyond; the dense sync costs a full hot table per step whatever is touched."""
    p = _profile("a", 10_000, np.maximum(1000 // (np.arange(10_000) + 1), 1))
    hot = p.rows[:100]
    for n in (2, 3, 8):
        off = expected_bytes(p, np.zeros(0, np.int64), 32, 4096, n)
        on = expected_bytes(p, hot, 32, 4096, n)
        moved = off["alltoall"] - on["alltoall"]  # the hot rows' share of the round trips
        assert on["sparse_sync"] == pytest.approx(moved * n / 2, rel=1e-9)
        assert on["dense_sync"] == 2 * (n - 1) * 4 * 33 * 100
    assert choose_sync({"a": p}, {"a": hot}, {"a": 32}, {"a": 4096}, 2) == "sparse"


def test_gmeta_profile_writes_the_profile_and_bad_tiering_flags_are_named(tiny, tmp_path):
    """`gmeta profile` prints the skew table and writes summary, npz files and the plot; a bad
    --tiering value (or one that cannot combine) is refused by the train config, naming the flag."""
    proc = run_gmeta("profile", "--data", tiny, "--out", tmp_path / "prof", cwd=REPO)
    assert "top 1%" in proc.stdout and "item" in proc.stdout
    assert {p.name for p in (tmp_path / "prof").iterdir()} >= {"summary.json", "item.npz", "skew.png"}
    proc = run_gmeta("profile", "--data", tmp_path / "nothing", cwd=REPO, check=False)
    assert proc.returncode == 2 and "schema" in proc.stderr
    from gmeta.cli import build_parser_for
    from gmeta.trainer.config import config_from_args

    for flags, message in ((["--tiering", "lots"], "--tiering must be off, auto or a byte budget"),
                           (["--tiering", "auto", "--parallel", "naive"], "does not combine with --parallel naive")):
        argv = ["train", "--model", "melu", "--data", str(tiny), "--tracking-uri", "none", *flags]
        with pytest.raises(ValueError, match=message):
            config_from_args(build_parser_for(argv).parse_args(argv))
