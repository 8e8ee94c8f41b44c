"""``gmeta convert movielens`` on tiny fixtures written in the three raw layouts (100K, 1M, latest).

The fixture is built so every split is non-empty and the expected result can be computed
independently here with plain Python: 45 users rate 16 old and 15 new movies each (timestamps
spread so the last 9 users to arrive are the cold ones; some timestamps tie), one user has too
few ratings and one too many. Of the 36 warm users, round(0.1 * 36) = 4 (a seeded draw, read back
from the output) are held out as the val split. Ids are read back to raw values through the
dataset's vocabularies (``DIR/_vocab``), so the checks say what the protocol says, in raw ids.
The command is a spec over ``gmeta convert table``: the last tests show the shipped spec
``tools/specs/movielens-latest.json`` gives the identical dataset from the raw CSV files.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from gmeta.cli import main as gmeta
from gmeta.io.schema import Schema
from gmeta.io.vocab import load_vocabularies
from gmeta.tools.movielens import AGE_GROUPS, GENRES

N_ITEMS, N_COLD_ITEMS = 120, 24          # the 24 latest-released items (20%) are cold
N_USERS, N_COLD_USERS = 45, 9            # of the 45 kept users, the 9 that arrive last are cold
N_VAL_USERS = 4                          # round(--val-fraction 0.1 * 36 warm users)
OCCUPATIONS = ("artist", "doctor", "engineer", "student", "writer")
AGE_1M = {10: 1, 20: 18, 30: 25, 40: 35, 47: 45, 52: 50, 60: 56}
SPLITS = ("train", "user_cold", "item_cold", "user_item_cold", "val")
WRITTEN = ("train", "val", "user_cold", "item_cold", "user_item_cold")     # the order schema.json lists them
REPO = Path(__file__).resolve().parents[1]
DEV_DATA = REPO.parent / "shared" / "data" / "ml-latest-small"


def _fixture():
    """The logical content shared by both layouts."""
    rng = np.random.default_rng(7)
    items = []
    for k in range(N_ITEMS):
        year = 0 if k == 0 else 1930 + k // 2          # k = 96..119 released last; item 0 unknown
        genres = sorted({k % 19, (7 * k + 3) % 19} - ({0} if k % 5 else set()))
        items.append({"id": 3 * k + 2, "year": year, "genres": genres, "title": f"Movie {k} caf\xe9"})
    warm_ids = [it["id"] for it in items[:N_ITEMS - N_COLD_ITEMS]]
    cold_ids = [it["id"] for it in items[N_ITEMS - N_COLD_ITEMS:]]
    users, ratings = [], []
    ages = list(AGE_1M)
    for j in range(N_USERS + 2):
        uid = 1000 - 7 * j                               # raw ids not in arrival order
        users.append({"id": uid, "age": ages[j % len(ages)], "gender": "MF"[j % 2],
                      "occupation": j % len(OCCUPATIONS), "zip": f"{(j * 3) % 10}{j:04d}" if j % 6 else f"T{j}K"})
        if j == N_USERS:        # too few ratings: dropped
            chosen = list(rng.choice(warm_ids, 12, replace=False))
        elif j == N_USERS + 1:  # too many ratings: dropped
            chosen = list(rng.choice(warm_ids + cold_ids, 101, replace=False))
        else:
            chosen = list(rng.choice(warm_ids, 16, replace=False)) + list(rng.choice(cold_ids, 15, replace=False))
            rng.shuffle(chosen)
        start = 880_000_000 + (j if j < N_USERS else 3) * 100_000
        for m, item in enumerate(chosen):
            ratings.append((uid, int(item), int(rng.integers(1, 6)), start + (m // 2) * 60))
    return items, users, ratings


def _item_100k(it):
    date = f"01-Jan-{it['year']}" if it["year"] else ""
    flags = "|".join("1" if g in it["genres"] else "0" for g in range(len(GENRES)))
    return f"{it['id']}|{it['title']}|{date}||http://x/{it['id']}|{flags}"


def _item_1m(it):
    title = f"{it['title']} ({it['year']})" if it["year"] else it["title"]
    return f"{it['id']}::{title}::{'|'.join(GENRES[g] for g in it['genres'])}"


def _item_latest(it):
    """A movies.csv line: the title quoted (it may hold commas), no genres as MovieLens writes it."""
    title = f"{it['title']}, The ({it['year']})" if it["year"] else f"{it['title']}, The"
    return f"{it['id']},\"{title}\",{'|'.join(GENRES[g] for g in it['genres']) or '(no genres listed)'}"


# per layout: its (ratings, users, items) files and how one rating / user / item is written there
LAYOUTS = {
    "100k": (("u.data", "u.user", "u.item"),
             (lambda r: "\t".join(map(str, r)),
              lambda u: f"{u['id']}|{u['age']}|{u['gender']}|{OCCUPATIONS[u['occupation']]}|{u['zip']}",
              _item_100k)),
    "1m": (("ratings.dat", "users.dat", "movies.dat"),
           (lambda r: "::".join(map(str, r)),
            lambda u: f"{u['id']}::{u['gender']}::{AGE_1M[u['age']]}::{u['occupation']}::{u['zip']}",
            _item_1m)),
    "latest": (("ratings.csv", None, "movies.csv"),
               (lambda r: f"{r[0]},{r[1]},{float(r[2])},{r[3]}", None, _item_latest)),
}
HEADERS = {"ratings.csv": "userId,movieId,rating,timestamp", "movies.csv": "movieId,title,genres"}


def write_raw(d, layout, items, users, ratings):
    """The fixture as the raw files of ``layout`` (latin-1 text, like the real files)."""
    os.makedirs(d, exist_ok=True)
    files, lines = LAYOUTS[layout]
    for name, line, rows in zip(files, lines, (ratings, users, items)):
        if name is None:
            continue
        with open(os.path.join(d, name), "w", encoding="utf-8" if layout == "latest" else "latin-1") as f:
            f.writelines([HEADERS[name] + "\n"] if name in HEADERS else [])
            f.writelines(line(row) + "\n" for row in rows)


def expected_tasks(items, users, ratings, val_users=frozenset()):
    """The protocol, recomputed with plain Python: {split: {raw user: [(item, rating), ...] by time}}.
    ``val_users`` (raw ids; the converter's seeded draw) go to val on warm items, nowhere on cold."""
    per_user = {}
    for u, i, r, t in ratings:
        per_user.setdefault(u, []).append((t, i, r))
    kept = {u: sorted(v) for u, v in per_user.items() if 13 <= len(v) <= 100}
    arrival = sorted(kept, key=lambda u: (kept[u][0][0], u))
    cold_users = set(arrival[len(arrival) - N_COLD_USERS:])
    cold_items = {it["id"] for it in items[N_ITEMS - N_COLD_ITEMS:]}
    out = {s: {} for s in SPLITS}
    for u, rows in kept.items():
        for t, i, r in rows:
            if u in val_users:
                if i not in cold_items:
                    out["val"].setdefault(u, []).append((i, r))
                continue
            s = SPLITS[(u in cold_users) + 2 * (i in cold_items)]
            out[s].setdefault(u, []).append((i, r))
    for s in SPLITS:
        out[s] = {u: v for u, v in out[s].items() if len(v) >= 13}
    return out, cold_users, cold_items


def read_split(d, split):
    files = sorted(glob.glob(os.path.join(d, split, "*.orc")))
    assert files, f"no ORC files in {d}/{split}"
    return pa.concat_tables([orc.ORCFile(f).read() for f in files])


def raw_split(d, split) -> dict:
    """A split's columns with every vocabulary-mapped feature read back to its raw value (lists
    of raw values for list features); ``task_id`` as written."""
    vocabs = load_vocabularies(d)
    schema = Schema.load(d)
    t = read_split(d, split).to_pydict()
    for f in schema.sparse:
        values = vocabs[f.table].values.to_pylist()
        t[f.name] = [[values[r] for r in v] if isinstance(v, list) else values[v] for v in t[f.name]]
    return t


def summary_of(d) -> dict:
    return json.loads(open(os.path.join(d, "convert.json")).read())


def val_raw_users(d, items=None, users=None, ratings=None):
    """Raw ids of the users in ``d``'s val split."""
    return set(raw_split(d, "val")["user_id"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both layouts converted from the same logical fixture: {layout: out dir}."""
    items, users, ratings = _fixture()
    root = tmp_path_factory.mktemp("ml")
    out = {}
    for layout in LAYOUTS:
        src, dst = root / f"src{layout}", root / f"out{layout}"
        write_raw(str(src), layout, items, users, ratings)
        assert gmeta(["convert", "movielens", "--src", str(src), "--out", str(dst), "--quiet"]) == 0
        out[layout] = str(dst)
    return out, (items, users, ratings)


@pytest.mark.parametrize("layout", ["100k", "1m", "latest"])
def test_tasks_match_the_protocol(converted, layout):
    """Every task: 13..100 rows, the 10 most recent ratings as query after the support rows, exact
    items and ratings as recomputed by hand (the val users' warm-item ratings in val, their
    cold-item ratings nowhere); click = rating >= 4."""
    outs, (items, users, ratings) = converted
    d = outs[layout]
    val_users = val_raw_users(d)
    expected, cold_users, cold_items = expected_tasks(items, users, ratings, val_users)
    schema = Schema.load(d)
    assert schema.splits == WRITTEN and schema.labels == ("click", "rating")
    summary = summary_of(d)
    assert summary["layout"] == layout
    assert summary["tasks"]["kept"] == N_USERS and summary["tasks"]["dropped"] == 2
    assert summary["tasks"]["val"] == len(val_users) == N_VAL_USERS
    assert summary["rows"]["rows_of_val_tasks_on_cold"] == 15 * N_VAL_USERS
    for split in SPLITS:
        t = raw_split(d, split)
        assert summary["splits"][split]["tasks"] == len(expected[split]) > 0
        assert summary["splits"][split]["rows"] == len(t["task_id"]) == sum(map(len, expected[split].values()))
        assert np.array_equal(t["click"], (np.array(t["rating"]) >= 4).astype(np.float32))
        tid = np.array(t["task_id"])
        starts = np.flatnonzero(np.r_[True, tid[1:] != tid[:-1]])
        assert len(starts) == len(set(tid.tolist())) == len(expected[split]), "tasks are not contiguous"
        got = {}
        for a, b in zip(starts, np.r_[starts[1:], len(tid)]):
            q = np.array(t["is_query"][a:b])
            assert q.sum() == 10 and np.all(q[:b - a - 10] == 0) and 13 <= b - a <= 100
            assert len(set(t["user_id"][a:b])) == 1
            got[t["user_id"][a]] = [(t["item_id"][k], t["rating"][k]) for k in range(a, b)]
        # the exact sequences, in time order (ties by item id), per raw user
        assert got == {u: [(i, float(r)) for i, r in v] for u, v in expected[split].items()}


@pytest.mark.parametrize("layout", ["100k", "1m", "latest"])
def test_cold_users_and_items_are_separated(converted, layout):
    """Cold items never occur in train or user_cold; cold users never in train or item_cold;
    item_cold users are existing (train) users; val users are warm users found in no other
    split, on warm items only."""
    outs, (items_, users_, ratings) = converted
    d = outs[layout]
    _, cold_users, cold_items = expected_tasks(items_, users_, ratings)
    t = {s: raw_split(d, s) for s in SPLITS}
    users = {s: set(t[s]["user_id"]) for s in SPLITS}
    items = {s: set(t[s]["item_id"]) for s in SPLITS}
    assert not (users["train"] | users["item_cold"]) & (users["user_cold"] | users["user_item_cold"])
    assert not (items["train"] | items["user_cold"]) & (items["item_cold"] | items["user_item_cold"])
    assert users["item_cold"] <= users["train"] and users["user_item_cold"] <= users["user_cold"]
    assert items["item_cold"] | items["user_item_cold"] <= cold_items
    assert not (items["train"] | items["user_cold"] | items["val"]) & cold_items
    assert users["user_cold"] == cold_users and not users["train"] & cold_users
    assert len(users["train"]) == N_USERS - N_COLD_USERS - N_VAL_USERS and len(users["user_cold"]) == N_COLD_USERS
    assert len(users["val"]) == N_VAL_USERS and not users["val"] & cold_users
    assert not users["val"] & set().union(*(users[s] for s in SPLITS if s != "val"))


def test_layouts_give_the_same_dataset(converted):
    """The same logical data in the 100K and the 1M layout converts to identical columns (but
    occupation: names in 100K, codes in 1M); the latest layout to the same columns but the
    demographics (it has none) and genre rows (its vocabulary holds only the genres it names)."""
    outs = converted[0]
    latest = Schema.load(outs["latest"])
    assert [f.name for f in latest.sparse] == ["user_id", "item_id", "genres", "year"]
    for s in SPLITS:
        a, b = read_split(outs["100k"], s), read_split(outs["1m"], s)
        for col in ("task_id", "is_query", "click", "rating", "user_id", "age", "gender", "item_id",
                    "genres", "year", "zip"):
            assert a.column(col).to_pylist() == b.column(col).to_pylist(), (s, col)
        a, c = raw_split(outs["100k"], s), raw_split(outs["latest"], s)
        for col in ("task_id", "is_query", "click", "rating", "user_id", "item_id", "year"):
            assert a[col] == c[col], (s, col)
        assert [sorted(g) for g in a["genres"]] == [sorted(g) for g in c["genres"]]


def test_features(converted):
    """Side features decoded as documented (age groups, gender, occupation, genres, release
    decade, zip), read back through the vocabularies."""
    outs, (items, users, ratings) = converted
    info = {u["id"]: u for u in users}
    item_info = {it["id"]: it for it in items}
    for split in SPLITS:
        t = raw_split(outs["100k"], split)
        for k in range(len(t["task_id"])):
            u = info[t["user_id"][k]]
            group = AGE_GROUPS[max(i for i, a in enumerate(AGE_GROUPS) if a <= u["age"])]
            assert (t["age"][k], t["gender"][k], t["occupation"][k], t["zip"][k]) == (
                group, u["gender"], OCCUPATIONS[u["occupation"]], u["zip"][0].upper())
            it = item_info[t["item_id"][k]]
            assert sorted(t["genres"][k]) == sorted(GENRES[g] for g in it["genres"])
            want_year = None if not it["year"] else min(max((it["year"] - 1930) // 10, 1), 8)
            assert t["year"][k] == want_year
    schema = Schema.load(outs["100k"])
    assert schema.table("zip").num_rows == 1 + len({u["zip"][0] for u in users})     # row 0: out of vocabulary
    assert schema.feature("genres").max_len == 2 and schema.table("item_id").num_rows == 1 + N_ITEMS


def test_reader_reads_every_split(converted):
    """MetaReader yields every task once with 10 query rows each, for every split."""
    from gmeta.io.reader import MetaReader

    d = converted[0]["1m"]
    for s in SPLITS:
        t = read_split(d, s)
        n_tasks = len(set(t.column("task_id").to_pylist()))
        r = MetaReader(d, split=s, tasks_per_batch=8, support_size=96, query_size=10, shuffle=False)
        assert r.num_tasks == n_tasks
        seen, q_rows, s_rows = [], 0.0, 0.0
        for batch in r.dataset(epoch=0):
            m = batch["task_mask"].numpy() > 0
            seen += batch["task_id"].numpy()[m].tolist()
            q_rows += batch["query"]["mask"].numpy()[m].sum()
            s_rows += batch["support"]["mask"].numpy()[m].sum()
            qm = batch["query"]["mask"].numpy()[m] > 0
            np.testing.assert_array_equal(batch["query"]["click"].numpy()[m][qm],
                                          (batch["query"]["rating"].numpy()[m][qm] >= 4).astype(np.float32))
        assert sorted(seen) == sorted(set(t.column("task_id").to_pylist()))
        assert q_rows == 10 * n_tasks and q_rows + s_rows == t.num_rows
        assert r.stats["truncated_tasks"] == 0


def test_layout_detection_errors(tmp_path, capsys):
    """A directory with neither layout fails with a message listing both sets of files."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gmeta(["convert", "movielens", "--src", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    for name in ("u.data", "u.user", "u.item", "ratings.dat", "users.dat", "movies.dat", "ratings.csv", "movies.csv"):
        assert name in err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "u.data").write_text("1\t2\t3\t4\n")
    assert gmeta(["convert", "movielens", "--src", str(partial), "--out", str(tmp_path / "o")]) == 2
    assert "100K files found but missing ['u.user', 'u.item']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[:5] + ["1\t2\n"] + r[6:], "u.data: cannot parse"),
    (lambda r: r[:5] + ["\t".join(r[5].split("\t")[:2] + ["9", "880000000\n"])] + r[6:],
     "u.data: line 6: column 'rating' = 9 is outside [1, 5]"),
    (lambda r: ["4242\t2\t3\t880000000\n"] + r, "u.data: line 1: user id 4242 is not in the user file"),
])
def test_bad_input_names_file_and_line(tmp_path, capsys, mutate, message):
    """Malformed or inconsistent raw files give an error naming the file (and line), not a crash."""
    items, users, ratings = _fixture()
    src = tmp_path / "src"
    write_raw(str(src), "100k", items, users, ratings)
    lines = (src / "u.data").read_text().splitlines(keepends=True)
    (src / "u.data").write_text("".join(mutate(lines)))
    assert gmeta(["convert", "movielens", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_val_split_is_seeded_and_optional(converted, tmp_path):
    """The val draw depends on --seed only (same seed, same users; another seed, other users);
    --val-fraction 0 writes no val split, puts those users back into train and item_cold and
    leaves user_cold and user_item_cold byte-identical."""
    outs, (items, users, ratings) = converted
    src = tmp_path / "src"
    write_raw(str(src), "1m", items, users, ratings)
    runs = {}
    for name, flags in (("again", []), ("seed1", ["--seed", "1"]), ("noval", ["--val-fraction", "0"])):
        runs[name] = str(tmp_path / name)
        assert gmeta(["convert", "movielens", "--src", str(src), "--out", runs[name], "--quiet", *flags]) == 0
    val = {k: val_raw_users(d) for k, d in (("default", outs["1m"]), ("again", runs["again"]), ("seed1", runs["seed1"]))}
    assert val["default"] == val["again"] and val["seed1"] != val["default"]
    assert len(val["seed1"]) == N_VAL_USERS
    assert set(Schema.load(runs["noval"]).splits) == set(SPLITS[:4]) and not os.path.exists(os.path.join(runs["noval"], "val"))
    summary = summary_of(runs["noval"])
    assert summary["tasks"]["val"] == summary["rows"]["rows_of_val_tasks_on_cold"] == 0
    noval = {s: read_split(runs["noval"], s).to_pydict() for s in SPLITS[:4]}
    assert len(set(noval["train"]["user_id"])) == N_USERS - N_COLD_USERS
    val_ids = set(read_split(outs["1m"], "val")["user_id"].to_pylist())
    for s in ("train", "item_cold"):   # the val users are back, under the same ids
        with_val = set(read_split(outs["1m"], s)["user_id"].to_pylist())
        assert set(noval[s]["user_id"]) == with_val | val_ids and not with_val & val_ids
    for s in ("user_cold", "user_item_cold"):
        assert noval[s] == read_split(outs["1m"], s).to_pydict(), s


@pytest.mark.parametrize("name, mutate, message", [
    ("ratings.csv", lambda r: r[:3] + ["1,2,5.5,880000000\n"] + r[4:],
     "ratings.csv: line 4: column 'rating' = 5.5 is outside [0.5, 5.0]"),
    ("ratings.csv", lambda r: r[:3] + ["1,x,4,880000000\n"] + r[4:], "ratings.csv: cannot parse as CSV"),
    ("ratings.csv", lambda r: ["userId,movieId,stars,timestamp\n"] + r[1:], "lacks the column(s) ['rating']"),
    ("movies.csv", lambda r: r + [r[1]], "movies.csv: item id 2 is listed twice"),
])
def test_latest_layout_bad_input(tmp_path, capsys, name, mutate, message):
    """The latest layout's CSV files: a rating off the half-star scale, a value that does not
    parse, a missing column, a movie listed twice; each names the file (and line or column)."""
    items, users, ratings = _fixture()
    src = tmp_path / "src"
    write_raw(str(src), "latest", items, users, ratings)
    lines = (src / name).read_text().splitlines(keepends=True)
    (src / name).write_text("".join(mutate(lines)))
    assert gmeta(["convert", "movielens", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_implicit_protocol_negatives(converted, tmp_path):
    """--negatives N: the rated rows of every task are exactly the explicit conversion's, all with
    click 1; each query set gets N label-0 rows and each support set one per support positive,
    of distinct items the user never rated in any split, from the task's item pool (warm items
    for train/val/user_cold, cold ones for the cold-item splits), each support negative right
    after a support positive; the draw is seeded (same seed, same rows) and the schema has no
    rating label."""
    outs, (items, users, ratings) = converted
    src = tmp_path / "src"
    write_raw(str(src), "1m", items, users, ratings)
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "5")):
        runs[name] = str(tmp_path / name)
        assert gmeta(["convert", "movielens", "--src", str(src), "--out", runs[name], "--quiet",
                      "--negatives", "6", "--seed", seed, "--val-fraction", "0"]) == 0
    schema = Schema.load(runs["a"])
    assert schema.labels == ("click",)
    explicit = str(tmp_path / "explicit")
    assert gmeta(["convert", "movielens", "--src", str(src), "--out", explicit, "--quiet", "--val-fraction", "0"]) == 0
    rated = {}
    for u, i, *_ in ratings:
        rated.setdefault(u, set()).add(i)
    _, _, cold_items = expected_tasks(items, users, ratings)
    warm_items = {it["id"] for it in items} - cold_items
    short = 0
    for s in SPLITS[:4]:
        t, e = raw_split(runs["a"], s), raw_split(explicit, s)
        assert t == raw_split(runs["b"], s)
        assert t["item_id"] != raw_split(runs["c"], s)["item_id"]
        tid, click, q, item, user = (np.array(t[k]) for k in ("task_id", "click", "is_query", "item_id", "user_id"))
        for task in np.unique(tid):
            rows = tid == task
            u = user[rows][0]
            pos, neg = rows & (click == 1), rows & (click == 0)
            want = [(i, qq) for uu, i, qq in zip(e["user_id"], e["item_id"], e["is_query"]) if uu == u]
            assert sorted(zip(item[pos].tolist(), q[pos].tolist())) == sorted(want)
            negs = set(item[neg].tolist())
            assert len(negs) == neg.sum() and not negs & rated[u]
            pool = cold_items if s in ("item_cold", "user_item_cold") else warm_items
            assert negs <= pool
            need = 6 + (pos & (q == 0)).sum()
            if len(pool - rated[u]) < need:   # a pool that runs out gives what it has
                short += 1
                assert negs == pool - rated[u]
                continue
            assert (neg & (q == 1)).sum() == 6 and (neg & (q == 0)).sum() == (pos & (q == 0)).sum()
            support = click[rows][q[rows] == 0]
            assert np.array_equal(support, np.tile([1.0, 0.0], len(support) // 2))
            assert np.all(q[rows][:-16] == 0) and np.all(q[rows][-16:] == 1)
    assert summary_of(runs["a"])["rows"]["tasks_short_of_negatives"] == short > 0


def test_cold_users_at_random(converted, tmp_path):
    """--cold-users random: as many cold users as the time rule, a seeded draw that differs
    from the latest arrivals."""
    outs, (items, users, ratings) = converted
    src = tmp_path / "src"
    write_raw(str(src), "1m", items, users, ratings)
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "3")):
        runs[name] = str(tmp_path / name)
        assert gmeta(["convert", "movielens", "--src", str(src), "--out", runs[name], "--quiet",
                      "--cold-users", "random", "--seed", seed]) == 0
    _, cold_by_time, _ = expected_tasks(items, users, ratings)
    assert summary_of(runs["a"])["tasks"]["cold"] == N_COLD_USERS
    cold_sets = {name: set(raw_split(d, "user_cold")["user_id"]) for name, d in runs.items()}
    assert cold_sets["a"] == cold_sets["b"] != cold_sets["c"]
    assert len(cold_sets["a"]) == len(cold_sets["c"]) == N_COLD_USERS
    assert cold_sets["a"] != cold_by_time


# Bad flags of `gmeta convert movielens`: tests/test_datagen.py::test_bad_flags_are_named, one test
# for every dataset-producing command (they share their flag checks, gmeta.tools.common).


def test_refuses_to_overwrite_without_flag(converted, tmp_path, capsys):
    items, users, ratings = converted[1]
    src = tmp_path / "src"
    write_raw(str(src), "1m", items, users, ratings)
    out = tmp_path / "out"
    assert gmeta(["convert", "movielens", "--src", str(src), "--out", str(out), "--quiet"]) == 0
    assert gmeta(["convert", "movielens", "--src", str(src), "--out", str(out), "--quiet"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert gmeta(["convert", "movielens", "--src", str(src), "--out", str(out), "--quiet", "--overwrite"]) == 0


# ---------------------------------------------------------------------------------- a spec over convert table
def _same_dataset(a, b) -> None:
    """Two dataset directories hold the same splits, rows, vocabularies and schema (but its
    ``meta``, which names how each was made)."""
    sa, sb = (json.loads(open(os.path.join(d, "schema.json")).read()) for d in (a, b))
    sa.pop("meta"), sb.pop("meta")
    assert sa == sb
    for split in sa["splits"]:
        assert read_split(a, split).equals(read_split(b, split)), split
    for table in os.listdir(os.path.join(a, "_vocab")):
        if table.endswith(".parquet"):
            assert pq.read_table(os.path.join(a, "_vocab", table)).equals(pq.read_table(os.path.join(b, "_vocab", table)))


@pytest.mark.parametrize("implicit", [False, True])
def test_movielens_is_the_shipped_spec_over_convert_table(tmp_path, implicit):
    """``gmeta convert movielens`` on the latest layout and ``gmeta convert table --spec
    tools/specs/movielens-latest.json`` on the same raw CSV files write the identical dataset,
    explicit and implicit (the same flags on both)."""
    items, users, ratings = _fixture()
    src = tmp_path / "src"
    write_raw(str(src), "latest", items, users, ratings)
    flags = (["--negatives", "6", "--support-negatives", "1"]) if implicit else []
    labels = ["--label", "click=rating > 0"] if implicit else []
    assert gmeta(["convert", "movielens", "--src", str(src), "--out", str(tmp_path / "ml"), "--quiet", *flags]) == 0
    assert gmeta(["convert", "table", "--spec", str(REPO / "tools" / "specs" / "movielens-latest.json"),
                  "--src", str(src), "--out", str(tmp_path / "tb"), "--quiet", *flags, *labels]) == 0
    _same_dataset(tmp_path / "ml", tmp_path / "tb")


@pytest.mark.skipif(not (DEV_DATA / "ratings.csv").exists(), reason=f"the development set is not at {DEV_DATA}")
def test_movielens_and_the_spec_agree_on_the_development_set(tmp_path):
    """The same on the real ratings (ml-latest-small: 100,836 ratings, every split non-empty)."""
    assert gmeta(["convert", "movielens", "--src", str(DEV_DATA), "--out", str(tmp_path / "ml"), "--quiet"]) == 0
    assert gmeta(["convert", "table", "--spec", str(REPO / "tools" / "specs" / "movielens-latest.json"),
                  "--src", str(DEV_DATA), "--out", str(tmp_path / "tb"), "--quiet"]) == 0
    _same_dataset(tmp_path / "ml", tmp_path / "tb")
    assert all(summary_of(tmp_path / "ml")["splits"][s]["tasks"] > 0 for s in WRITTEN)
