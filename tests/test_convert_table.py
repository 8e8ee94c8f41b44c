"""``gmeta convert table``: event tables in Parquet and CSV (with a side table, derived columns,
list, hashed and dense features) into Meta-IO tasks, checked against the protocol recomputed
here in plain Python; bad input named by file, column and row; the same dataset whatever the
number of partitions; the development spec on a slice of ml-latest-small, trained for one epoch;
and the memory bound, measured on a real subprocess."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from gmeta.cli import main as gmeta
from gmeta.io.schema import Schema
from gmeta.io.vocab import load_vocabularies
from gmeta.tools.table import partition
from gmeta.tools.table.partition import MemoryPlan

try:
    import yaml
except ImportError:  # YAML specs are optional
    yaml = None

REPO = Path(__file__).resolve().parents[1]
DEV_DATA = REPO.parent / "shared" / "data" / "ml-latest-small"
BIN = Path(sys.executable).parent
DAY = 86400


def read_split(d, split) -> dict:
    files = sorted(glob.glob(os.path.join(d, split, "*.orc")))
    assert files, f"no ORC files in {d}/{split}"
    return pa.concat_tables([orc.ORCFile(f).read() for f in files]).to_pydict()


def tasks_of(t: dict) -> dict:
    """{task id: [row index, ...]} in file order (a task's rows are contiguous)."""
    out = {}
    for k, tid in enumerate(t["task_id"]):
        out.setdefault(tid, []).append(k)
    return out


def raw(vocab, rows):
    return vocab.raw_values(rows)


# ---------------------------------------------------------------------------------- flags only, Parquet
@pytest.fixture(scope="module")
def parquet_events(tmp_path_factory):
    """30 users' events: ISO timestamps (with ties), string users, int items, a list column with
    empty lists, 40-bit ad ids (hashed), a float price."""
    rng = np.random.default_rng(1)
    n = 400
    ts = np.datetime64("2021-01-01T00:00:00") + (rng.integers(0, 2000, n) * 60).astype("timedelta64[s]")
    tags = [[f"t{j}" for j in rng.choice(6, rng.integers(0, 4), replace=False)] for _ in range(n)]
    table = pa.table({"user": [f"u{k}" for k in rng.integers(0, 30, n)], "ts": pa.array(ts).cast(pa.string()),
                      "item": rng.integers(0, 50, n), "rating": rng.integers(1, 6, n).astype(float),
                      "tags": pa.array(tags, pa.list_(pa.string())), "ad": rng.integers(0, 1 << 40, n),
                      "price": rng.random(n)})
    d = tmp_path_factory.mktemp("pq")
    pq.write_table(table, d / "events.parquet", row_group_size=128)
    out = d / "out"
    assert gmeta(["convert", "table", "--input", str(d / "events.parquet"), "--task", "user", "--order", "ts",
                  "--label", "click=rating >= 4", "--label", "rating=rating", "--sparse", "user", "--sparse", "item",
                  "--sparse", "tags", "--sparse", "ad", "--hashed", "ad=7", "--dense", "price", "--item", "item",
                  "--query-last", "2", "--min-events", "3", "--val-fraction", "0.2", "--out", str(out),
                  "--quiet"]) == 0
    return table.to_pydict(), str(out)


def test_flags_only_parquet_matches_the_protocol(parquet_events):
    """Every task is its user's events in time order (ties in input order), the last 2 the query;
    ids map back to the raw values through the saved vocabularies; lists keep their values;
    hashed ids are stored as given; val is round(0.2 x 30) users held out of train."""
    events, out = parquet_events
    schema = Schema.load(out)
    vocabs = load_vocabularies(out)
    assert schema.splits == ("train", "val") and schema.labels == ("click", "rating")
    assert {t.name: (t.num_rows, t.hashed) for t in schema.tables} == \
        {"user": (31, False), "item": (len(set(events["item"])) + 1, False), "tags": (7, False), "ad": (7, True)}
    assert schema.feature("tags").max_len == 3 and schema.item_id_feature == "item"
    assert {f.name: f.group for f in schema.sparse} == {"user": "user", "item": "item", "tags": "context",
                                                        "ad": "context"}
    assert set(vocabs) == {"user", "item", "tags"}
    by_user = {}
    for k, u in enumerate(events["user"]):
        by_user.setdefault(u, []).append(k)
    seen = {}
    for split in schema.splits:
        t = read_split(out, split)
        for rows in tasks_of(t).values():
            user = raw(vocabs["user"], [t["user"][rows[0]]])[0]
            want = sorted(by_user[user], key=lambda k: (events["ts"][k], k))
            assert user not in seen and len(rows) == len(want)
            seen[user] = split
            assert [t["is_query"][r] for r in rows] == [0] * (len(rows) - 2) + [1, 1]
            assert raw(vocabs["item"], [t["item"][r] for r in rows]) == [events["item"][k] for k in want]
            assert [sorted(raw(vocabs["tags"], t["tags"][r])) for r in rows] == [sorted(events["tags"][k])
                                                                               for k in want]
            assert [t["ad"][r] for r in rows] == [events["ad"][k] for k in want]
            assert np.allclose([t["price"][r] for r in rows], [events["price"][k] for k in want])
            assert [t["click"][r] for r in rows] == [float(events["rating"][k] >= 4) for k in want]
    assert sorted(seen) == sorted(by_user)
    assert sum(s == "val" for s in seen.values()) == round(0.2 * 30)


def test_partitions_and_re_splitting_give_the_same_tasks(parquet_events, tmp_path, monkeypatch):
    """The external group-by does not change the data: 1 partition, 5 partitions, and partitions
    split again in pass 2 (a limit of 1 byte forces it) write the same tasks."""
    _, out = parquet_events
    src = str(Path(out).parent / "events.parquet")
    base = ["convert", "table", "--input", src, "--task", "user", "--order", "ts", "--label", "click=rating >= 4",
            "--sparse", "item", "--query-last", "2", "--quiet"]

    def content(d):
        t = read_split(d, "train")
        return sorted((t["task_id"][r], t["item"][r], t["is_query"][r]) for r in range(len(t["task_id"])))

    assert gmeta(base + ["--partitions", "1", "--out", str(tmp_path / "p1")]) == 0
    assert gmeta(base + ["--partitions", "5", "--out", str(tmp_path / "p5")]) == 0
    monkeypatch.setattr(MemoryPlan, "partition_limit", lambda self, state: 1.0)
    assert gmeta(base + ["--partitions", "2", "--out", str(tmp_path / "split")]) == 0
    summary = json.loads((tmp_path / "split" / "convert.json").read_text())
    assert summary["memory"]["split_again"] >= 2
    assert content(tmp_path / "p1") == content(tmp_path / "p5") == content(tmp_path / "split")


def test_negatives_are_the_same_whatever_the_partitions(parquet_events, tmp_path):
    """--negatives: each task's sampled label-0 rows are distinct items it never had an event
    with, and the draws (a hash of seed, task and attempt) give the same tasks in 1 or 5
    partitions; a negative's context features are those of the event it follows."""
    events, out = parquet_events
    src = str(Path(out).parent / "events.parquet")
    base = ["convert", "table", "--input", src, "--task", "user", "--order", "ts", "--label", "click=rating > 0",
            "--sparse", "user", "--sparse", "item", "--item", "item", "--query-last", "2", "--negatives", "3",
            "--support-negatives", "1", "--quiet"]
    for n in (1, 5):
        assert gmeta(base + ["--partitions", str(n), "--out", str(tmp_path / f"p{n}")]) == 0
    one, five = read_split(tmp_path / "p1", "train"), read_split(tmp_path / "p5", "train")

    def by_task(t):
        return {tid: [(t["item"][r], t["click"][r], t["is_query"][r]) for r in rows] for tid, rows in tasks_of(t).items()}

    assert by_task(one) == by_task(five)
    vocabs = load_vocabularies(str(tmp_path / "p1"))
    had = {}
    for u, i in zip(events["user"], events["item"]):
        had.setdefault(u, set()).add(i)
    for rows in tasks_of(one).values():
        user = raw(vocabs["user"], [one["user"][rows[0]]])[0]
        negatives = [raw(vocabs["item"], [one["item"][r]])[0] for r in rows if one["click"][r] == 0]
        queries = [one["click"][r] for r in rows if one["is_query"][r]]
        assert queries.count(0.0) == 3 and len(set(negatives)) == len(negatives) and not set(negatives) & had[user]
    # a context feature of a negative is the one of the event it follows
    assert gmeta(base + ["--sparse", "tags", "--out", str(tmp_path / "tags")]) == 0
    t = read_split(tmp_path / "tags", "train")
    for rows in tasks_of(t).values():
        for a, b in zip(rows, rows[1:]):
            if t["click"][b] == 0 and not t["is_query"][b]:
                assert t["tags"][b] == t["tags"][a]


def test_negatives_and_buckets_errors_name_the_field(parquet_events, tmp_path, capsys):
    _, out = parquet_events
    src = str(Path(out).parent / "events.parquet")
    base = ["convert", "table", "--input", src, "--task", "user", "--order", "ts", "--sparse", "item", "--item", "item",
            "--query-last", "2", "--out", str(tmp_path / "o")]
    assert gmeta(base + ["--label", "rating=rating", "--negatives", "3"]) == 2
    assert "no value for the label(s) ['rating']; use event labels" in capsys.readouterr().err
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"sparse": [{"name": "tags", "column": "tags", "group": "item"}]}))
    assert gmeta(base + ["--spec", str(spec), "--label", "click=rating > 0", "--negatives", "3"]) == 2
    assert "item feature 'tags' reads column 'tags', which is neither the item id column" in capsys.readouterr().err
    spec.write_text(json.dumps({"derive": [{"name": "b", "column": "price", "buckets": [0.5, 0.2]}]}))
    assert gmeta(base + ["--spec", str(spec), "--label", "click=rating > 0"]) == 2
    assert "derive 'b': buckets [0.5, 0.2] must be ascending numbers" in capsys.readouterr().err
    spec.write_text(json.dumps({"cold": {"items": {"after": 5, "by": "price"}}}))
    assert gmeta(base + ["--spec", str(spec), "--label", "click=rating > 0"]) == 2
    assert "cold.items.by ranks the items by 'price'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- spec, CSV, side table, splits
N_USERS, N_COLD, WARM_ITEMS, COLD_ITEMS = 40, 10, 25, (26, 27, 28, 29)
T_COLD_ITEMS = 100 * DAY


def _events_csv(path, users):
    """User k arrives on day k: 12 events on warm items, then 4 on the cold items (first seen on
    day 200, after T)."""
    lines = ["userId,movieId,rating,timestamp"]
    for k, u in enumerate(users):
        for j in range(12):
            lines.append(f"{u},{(k + j) % WARM_ITEMS + 1},{1 + (k * 7 + j) % 5}.0,{k * DAY + j * 3600}")
        for j, item in enumerate(COLD_ITEMS):
            lines.append(f"{u},{item},{1 + (k + j) % 5}.5,{200 * DAY + k * 60 + j}")
    Path(path).write_text("\n".join(lines) + "\n")


def _movies_csv(path, n=31):
    lines = ["movieId,title,genres"]
    for i in range(1, n + 1):
        genres = "(no genres listed)" if i % 7 == 0 else "|".join(["Drama", "Comedy", "Action"][: 1 + i % 3])
        lines.append(f'{i},"Movie {i}, The ({1980 + i})",{genres}')
    Path(path).write_text("\n".join(lines) + "\n")


SPEC = {
    "input": "ratings.csv",
    "task": "userId",
    "order": ["timestamp", "movieId"],
    "query": {"last": 3},
    "min_events": 4,
    "labels": {"click": "rating >= 4", "rating": "rating"},
    "join": [{"path": "movies.csv", "on": "movieId"}],
    "derive": [{"name": "year", "column": "title", "regex": "\\((\\d{4})\\)\\s*$"}],
    "sparse": [{"name": "user_id", "column": "userId"}, {"name": "item_id", "column": "movieId"},
               {"name": "genres", "column": "genres", "delimiter": "|", "drop": ["(no genres listed)"]},
               {"name": "year", "column": "year"}],
    "item_id_feature": "item_id",
    "cold": {"users": {"fraction": 0.25}, "items": {"after": T_COLD_ITEMS}},
    "val_fraction": 0.2,
    "seed": 3,
}


@pytest.fixture(scope="module")
def spec_dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    _events_csv(d / "ratings.csv", range(100, 100 + N_USERS))
    _movies_csv(d / "movies.csv")
    (d / "spec.json").write_text(json.dumps(SPEC))
    out = d / "out"
    assert gmeta(["convert", "table", "--spec", str(d / "spec.json"), "--src", str(d), "--out", str(out),
                  "--quiet"]) == 0
    return d, str(out)


def test_spec_with_side_table_cold_and_val_splits(spec_dataset):
    """The last quarter of users to arrive are cold, items first seen after T are cold; train
    users' cold-item events form item_cold, cold users' user_item_cold; val is round(0.2 x 30)
    warm users whose cold-item events are dropped; genres and year come from the side table."""
    d, out = spec_dataset
    schema, vocabs = Schema.load(out), load_vocabularies(out)
    summary = json.loads(Path(out, "convert.json").read_text())
    assert schema.splits == ("train", "val", "user_cold", "item_cold", "user_item_cold")
    assert {f.name: f.group for f in schema.sparse} == {"user_id": "user", "item_id": "item", "genres": "item",
                                                        "year": "item"}
    cold_users = set(range(100 + N_USERS - N_COLD, 100 + N_USERS))
    users = {}
    for split in schema.splits:
        t = read_split(out, split)
        for rows in tasks_of(t).values():
            user = raw(vocabs["user_id"], [t["user_id"][rows[0]]])[0]
            items = raw(vocabs["item_id"], [t["item_id"][r] for r in rows])
            users.setdefault(user, set()).add(split)
            cold_items = [i in COLD_ITEMS for i in items]
            assert all(cold_items) if "item" in split else not any(cold_items)
            assert (user in cold_users) == (split in ("user_cold", "user_item_cold"))
            assert len(rows) == (4 if "item" in split else 12)
            assert [t["is_query"][r] for r in rows] == [0] * (len(rows) - 3) + [1] * 3
            years = raw(vocabs["year"], [t["year"][r] for r in rows])
            assert years == [str(1980 + i) for i in items]
            genres = [sorted(raw(vocabs["genres"], t["genres"][r])) for r in rows]
            assert genres == [[] if i % 7 == 0 else sorted(["Drama", "Comedy", "Action"][: 1 + i % 3]) for i in items]
    val = {u for u, s in users.items() if "val" in s}
    assert len(val) == round(0.2 * (N_USERS - N_COLD)) and all(users[u] == {"val"} for u in val)
    warm_train = set(range(100, 100 + N_USERS)) - cold_users - val
    assert all(users[u] == {"train", "item_cold"} for u in warm_train)
    assert all(users[u] == {"user_cold", "user_item_cold"} for u in cold_users)
    assert summary["rows"]["rows_of_val_tasks_on_cold"] == 4 * len(val)
    assert summary["tasks"]["cold"] == N_COLD and summary["tasks"]["cold_items"] == len(COLD_ITEMS)
    assert summary["side_tables"][str(Path(d, "movies.csv"))]["events_without_match"] == 0
    assert {k: v["size"] for k, v in summary["vocabularies"].items()} == \
        {"user_id": N_USERS + 1, "item_id": 30, "genres": 4, "year": 30}


def test_vocab_from_keeps_rows_and_appends_new_values(spec_dataset, tmp_path):
    d, out = spec_dataset
    before = load_vocabularies(out)
    src = tmp_path / "day2"
    src.mkdir()
    _events_csv(src / "ratings.csv", [100, 105, 777])     # a new user; item 30 is new too
    with open(src / "ratings.csv", "a") as f:
        f.writelines(f"777,30,4.0,{300 * DAY + j}\n" for j in range(3))
    _movies_csv(src / "movies.csv")
    assert gmeta(["convert", "table", "--spec", str(d / "spec.json"), "--src", str(src), "--vocab-from", out,
                  "--out", str(tmp_path / "out2"), "--quiet"]) == 0
    after = load_vocabularies(str(tmp_path / "out2"))
    for name, old in before.items():
        new = after[name]
        assert new.values.to_pylist()[:old.size] == old.values.to_pylist()
        assert new.previous == old.version
    assert after["user_id"].values.to_pylist()[-1] == 777 and after["item_id"].values.to_pylist()[-1] == 30
    schema = Schema.load(str(tmp_path / "out2"))
    assert schema.table("item_id").num_rows == before["item_id"].size + 1
    index = json.loads((tmp_path / "out2" / "_vocab" / "vocab.json").read_text())
    assert index["tables"]["item_id"]["previous"] == before["item_id"].version


@pytest.mark.skipif(yaml is None, reason="PyYAML is not installed: YAML specs are optional")
def test_yaml_spec_gives_the_json_spec_s_dataset(spec_dataset, tmp_path):
    d, out = spec_dataset
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    assert gmeta(["convert", "table", "--spec", str(tmp_path / "spec.yaml"), "--src", str(d), "--out",
                  str(tmp_path / "y"), "--quiet"]) == 0
    assert read_split(str(tmp_path / "y"), "train") == read_split(out, "train")


def test_query_and_split_columns_and_query_fraction(tmp_path):
    rows = ["u,ts,item,click,role,part"]
    for u in range(4):
        for j in range(6):
            rows.append(f"a{u},{j},{j},{(u + j) % 2},{int(j >= 4 - u % 2)},{'user_cold' if u == 3 else 'train'}")
    (tmp_path / "e.csv").write_text("\n".join(rows) + "\n")
    common = ["convert", "table", "--input", str(tmp_path / "e.csv"), "--task", "u", "--order", "ts",
              "--label", "click=click", "--sparse", "item", "--quiet"]
    assert gmeta(common + ["--query-column", "role", "--split-column", "part", "--out", str(tmp_path / "c")]) == 0
    assert Schema.load(str(tmp_path / "c")).splits == ("train", "user_cold")
    t = read_split(str(tmp_path / "c"), "train")
    assert [t["is_query"][r] for r in tasks_of(t)[0]] == [0, 0, 0, 0, 1, 1]
    assert [t["is_query"][r] for r in tasks_of(t)[1]] == [0, 0, 0, 1, 1, 1]
    assert gmeta(common + ["--query-fraction", "0.5", "--out", str(tmp_path / "f")]) == 0
    t = read_split(str(tmp_path / "f"), "train")
    assert all([t["is_query"][r] for r in rows] == [0, 0, 0, 1, 1, 1] for rows in tasks_of(t).values())


# ---------------------------------------------------------------------------------- bad input
GOOD = ("user,ts,item,rating,title\na,2021-01-01,1,4.0,x\na,2021-01-02,2,3.0,y\nb,2021-01-01,1,5.0,z\n"
        "b,2021-01-03,3,1.0,w\n")
FLAGS = ["--task", "user", "--order", "ts", "--label", "click=rating >= 4", "--sparse", "item", "--query-last", "1"]


@pytest.mark.parametrize("text, flags, message", [
    (GOOD, ["--task", "user", "--order", "time", "--label", "click=rating >= 4", "--query-last", "1"],
     r"e\.csv: column 'time': column is missing"),
    (GOOD, FLAGS + ["--dense", "title"], r"e\.csv: column 'title': type string cannot be used as dense"),
    (GOOD.replace("2021-01-02", "2021-13-45"), FLAGS,
     r"e\.csv: column 'ts': row 2 \(line 3\): '2021-13-45' does not parse as a number or an ISO-8601 timestamp"),
    (GOOD.replace("\nb,2021-01-01", "\n,2021-01-01"), FLAGS, r"e\.csv: column 'user': row 3 \(line 4\): no task id"),
    (GOOD, FLAGS[:4] + ["--label", "click=rating", "--query-last", "1"],
     r"e\.csv: column 'rating': row 1 \(line 2\): value 4 is outside \[0, 1\]"),
    (GOOD.replace("4.0,x", "inf,x"), FLAGS, r"e\.csv: column 'rating': row 1 \(line 2\): non-finite value inf"),
    (GOOD.replace("4.0,x", ",x"), FLAGS, r"e\.csv: column 'rating': row 1 \(line 2\): no value for label .click."),
])
def test_bad_input_is_named_by_file_column_and_row(tmp_path, capsys, text, flags, message):
    (tmp_path / "e.csv").write_text(text)
    assert gmeta(["convert", "table", "--input", str(tmp_path / "e.csv"), *flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmeta convert table: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "o" / "schema.json").exists()


def test_bad_spec_names_the_field(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps({"input": "x.csv", "task": "u", "order": "t",
                                                 "labels": {"click": "r >= 4"}, "query": {"last": 1, "fraction": 0.5}}))
    assert gmeta(["convert", "table", "--spec", str(tmp_path / "s.json"), "--out", str(tmp_path / "o")]) == 2
    assert "exactly one support/query rule" in capsys.readouterr().err
    (tmp_path / "s.json").write_text(json.dumps({"input": "x.csv", "labels": {"likes": "r"}}))
    assert gmeta(["convert", "table", "--spec", str(tmp_path / "s.json"), "--out", str(tmp_path / "o")]) == 2
    assert "spec: labels: unknown key(s) ['likes']; expected a subset of ['click', 'conversion', 'rating']" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------- the development set
@pytest.mark.skipif(not (DEV_DATA / "ratings.csv").exists(),
                    reason=f"the development set is not at {DEV_DATA} (../shared/data/ml-latest-small)")
def test_dev_spec_on_a_slice_of_ml_latest_small_trains(tmp_path):
    """The shipped spec converts the first 60 users of ml-latest-small (a copy with its README)
    and MeLU trains one epoch on the result."""
    src = tmp_path / "mls"
    src.mkdir()
    ratings = pacsv.read_csv(DEV_DATA / "ratings.csv")
    users = ratings.column("userId").to_numpy()
    pacsv.write_csv(ratings.filter(pa.array(users <= 60)), src / "ratings.csv")
    shutil.copy(DEV_DATA / "movies.csv", src / "movies.csv")
    shutil.copy(DEV_DATA / "README.txt", src / "README.txt")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    out = tmp_path / "data"
    spec = REPO / "tools" / "specs" / "ml-latest-small.json"
    proc = subprocess.run([str(BIN / "gmeta"), "convert", "table", "--spec", str(spec), "--src", str(src),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    schema = Schema.load(str(out))
    assert schema.splits == ("train", "val", "user_cold") and schema.labels == ("click", "rating")
    summary = json.loads((out / "convert.json").read_text())
    assert summary["tasks"]["kept"] == 60 and summary["tasks"]["cold"] == 12
    assert summary["splits"]["train"]["tasks"] + summary["splits"]["val"]["tasks"] == 48
    proc = subprocess.run([str(BIN / "gmeta"), "train", "--model", "melu", "--data", str(out), "--epochs", "1",
                           "--tracking-uri", "none", "--no-saved-model", "--checkpoint-dir", "none",
                           "--output-dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env,
                          timeout=300, cwd=str(tmp_path), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["user_cold"]["tasks"] == 12 and 0.0 <= result["user_cold"]["gauc_adapted"] <= 1.0


# ---------------------------------------------------------------------------------- the memory bound
def _events_parquet(path, n, users):
    rng = np.random.default_rng(0)
    cats = pa.array([f"category-{k:05d}" for k in range(2000)])
    table = pa.table({"user": rng.integers(0, users, n), "ts": rng.integers(1_000_000_000, 1_100_000_000, n),
                      "item": rng.integers(0, 20000, n), "rating": rng.integers(1, 6, n).astype(np.float64),
                      "cat": cats.take(pa.array(rng.integers(0, 2000, n)))})
    pq.write_table(table, path, row_group_size=65536)
    return table.nbytes


#: runs a command and prints its peak RSS: RUSAGE_CHILDREN of a small launcher, because a child
#: forked straight from pytest inherits pytest's own peak (Linux keeps ru_maxrss across exec)
LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def _peak_rss_kib(argv) -> tuple:
    """Run a command; its exit status, stderr and peak RSS in KiB."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, timeout=300,
                          check=False)
    return proc.returncode, proc.stderr, int(proc.stdout.split()[-1])


def test_memory_bound_holds_on_an_input_several_times_larger(tmp_path):
    """``--memory-mb 64`` on 5M events (239 MB in memory as Arrow, 3.7 times the bound): the
    peak RSS of the conversion stays within the peak of the same command on a 4,000-event input
    (the interpreter, pyarrow, the ORC writers: what does not grow with the input) plus 64 MB;
    and the input really was partitioned (many partitions, each under the pass-2 limit)."""
    memory_mb = 64
    small_bytes = _events_parquet(tmp_path / "small.parquet", 4_000, 40)
    big_bytes = _events_parquet(tmp_path / "big.parquet", 5_000_000, 50_000)
    assert big_bytes >= 3.5 * memory_mb * partition.MIB and small_bytes < partition.MIB
    peaks = {}
    for name in ("small", "big"):
        argv = [str(BIN / "gmeta"), "convert", "table", "--input", str(tmp_path / f"{name}.parquet"), "--task", "user",
                "--order", "ts", "--label", "click=rating >= 4", "--label", "rating=rating", "--sparse", "user",
                "--sparse", "item", "--sparse", "cat", "--item", "item", "--query-last", "5",
                "--cold-users-fraction", "0.2", "--val-fraction", "0.1", "--memory-mb", str(memory_mb),
                "--out", str(tmp_path / name)]
        code, err, peaks[name] = _peak_rss_kib(argv)
        assert code == 0, err[-3000:]
        assert "rows/s" in err
    summary = json.loads((tmp_path / "big" / "convert.json").read_text())
    assert summary["rows"]["written"] == 5_000_000 and summary["memory"]["partitions"] >= 32
    assert summary["memory"]["largest_partition_mb"] <= 1.25 * summary["memory"]["partition_limit_mb"]
    assert set(Schema.load(str(tmp_path / "big")).splits) == {"train", "val", "user_cold"}
    excess_mb = (peaks["big"] - peaks["small"]) / 1024
    print(f"peak RSS: small {peaks['small'] / 1024:.0f} MB, big {peaks['big'] / 1024:.0f} MB, "
          f"excess {excess_mb:.0f} MB (bound {memory_mb} MB); {summary['rows_per_s']:,.0f} rows/s")
    assert excess_mb <= memory_mb
