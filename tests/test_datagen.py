"""``gmeta datagen``: layout, planted structure, cold and val splits, regimes, the posterior oracle,
determinism, streaming, bad flags."""

from __future__ import annotations

import glob
import json
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pytest

from gmeta.cli import main as gmeta
from gmeta.io.schema import Schema
from gmeta.io.tables import arrow_table
from gmeta.tools.datagen import generate as dg

SPLITS = ("train", "user_cold", "item_cold", "user_item_cold", "val")
# `gmeta datagen --seed 0` before the val split existed: (rows, ctr, oracle AUC) per split; the
# val split must leave these splits' content unchanged
PINNED = {"train": (86_811, 0.278444, 0.863647), "user_cold": (14_299, 0.287782, 0.872944),
          "item_cold": (13_761, 0.285226, 0.872842), "user_item_cold": (13_771, 0.298308, 0.876952)}
SMALL = ["--train-users", "300", "--cold-users", "60", "--items", "200", "--cold-items", "40",
         "--chunk-users", "64", "--rows-per-stripe", "2048"]


def read_split(d, split) -> dict:
    files = sorted(glob.glob(os.path.join(d, split, "*.orc")))
    assert files, f"no ORC files in {d}/{split}"
    t = pa.concat_tables([orc.ORCFile(f).read() for f in files])
    out = {n: t.column(n).to_numpy() for n in t.column_names if n != "item_tags"}
    out["item_tags"] = t.column("item_tags").to_pylist()
    return out


def auc(score, label) -> float:
    """Exact ROC AUC with ties counted one half (rank statistic)."""
    score, label = np.asarray(score, np.float64), np.asarray(label) > 0.5
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    avg_rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]
    n_pos, n_neg = label.sum(), (~label).sum()
    return float((avg_rank[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The dataset `gmeta datagen --out DIR --seed 0` makes with no other flag."""
    d = str(tmp_path_factory.mktemp("synth") / "data")
    assert gmeta(["datagen", "--out", d, "--seed", "0", "--quiet"]) == 0
    return d, {s: read_split(d, s) for s in SPLITS}


def test_default_dataset_layout(default_data):
    """Sizes of the default dataset, schema as documented, task structure of every split."""
    d, data = default_data
    schema = Schema.load(d)
    assert schema.splits == SPLITS and schema.labels == ("click", "conversion", "rating")
    assert schema.oracle == ("p_click", "p_ctcvr") and schema.item_id_feature == "item_id"
    assert [f.name for f in schema.sparse] == ["user_id", "age", "gender", "occupation", "item_id",
                                               "item_category", "item_tags"]
    assert schema.feature("item_tags").max_len == 4 and schema.feature("item_tags").table == "tag"
    assert {f.name: f.group for f in schema.dense} == {"item_price": "item", "user_activity": "user"}
    assert schema.table("user_id").num_rows == 2500 + 2 * 400 + 40
    assert schema.table("item_id").num_rows == 1000 + 250
    summary = json.loads(open(os.path.join(d, "datagen.json")).read())
    assert {k: summary["settings"][k] for k in ("regime", "support_min", "support_max", "side_strength",
                                               "val_users")} == {"regime": "default", "support_min": 10,
                                                                 "support_max": 40, "side_strength": 1.0,
                                                                 "val_users": 40}
    for split, (rows, ctr, oracle) in PINNED.items():
        s = summary["splits"][split]
        assert (s["rows"], s["ctr"]) == (rows, ctr) and abs(s["oracle_auc_click"] - oracle) < 2e-6, (split, s)
    for split, users in zip(SPLITS, (2500, 400, 400, 400, 40)):
        t = data[split]
        tid = t["task_id"]
        starts = np.flatnonzero(np.r_[True, tid[1:] != tid[:-1]])
        sizes = np.diff(np.r_[starts, len(tid)])
        assert len(starts) == len(np.unique(tid)) == users, "tasks must be contiguous"
        q = t["is_query"].astype(np.int64)
        q_per_task = np.add.reduceat(q, starts)
        assert np.all(q_per_task == 10)
        assert 10 <= (sizes - 10).min() and (sizes - 10).max() <= 40
        # support rows come first: the flag never drops back to 0 inside a task
        assert np.all(np.diff(q)[np.diff(tid) == 0] >= 0)
        # a task's items are distinct
        assert len(np.unique(tid * 10_000 + t["item_id"])) == len(tid)
        assert summary["splits"][split]["users"] == users and summary["splits"][split]["rows"] == len(tid)
        # labels: conversion only after a click, integer ratings 1..5, oracle columns consistent
        assert np.all(t["conversion"] <= t["click"])
        assert set(np.unique(t["rating"])) <= {1.0, 2.0, 3.0, 4.0, 5.0}
        assert np.all((t["p_ctcvr"] <= t["p_click"]) & (t["p_click"] > 0) & (t["p_click"] < 1))
        assert 0.2 <= t["click"].mean() <= 0.35
        assert 0.05 <= t["conversion"].sum() / t["click"].sum() <= 0.3
        assert all(1 <= len(x) <= 4 and len(set(x)) == len(x) for x in t["item_tags"][:2000])
    total = sum(len(t["task_id"]) for t in data.values())
    assert 100_000 < total < 200_000
    assert summary["splits"]["val"]["mean_support_rows"] == (len(data["val"]["task_id"]) - 400) / 40


def test_planted_structure(default_data):
    """Oracle AUC on query rows is high (> 0.7) and matches datagen.json; side features alone
    explain much less; a user's support set adds information side features do not have."""
    d, data = default_data
    summary = json.loads(open(os.path.join(d, "datagen.json")).read())
    for split in SPLITS:
        t = data[split]
        q = t["is_query"] == 1
        oracle = auc(t["p_click"][q], t["click"][q])
        assert oracle > 0.7, (split, oracle)
        assert abs(oracle - summary["splits"][split]["oracle_auc_click"]) < 2e-3
        assert abs(auc(t["p_ctcvr"][q], t["conversion"][q]) - summary["splits"][split]["oracle_auc_ctcvr"]) < 2e-3
        assert summary["splits"][split]["side_only_auc_click"] < oracle - 0.05

    # A logistic model on side features (user side x item category crosses, item id, dense),
    # with and without the user's support click rate, fit on train query rows, scored on
    # user_cold query rows (new users, so only side features and the support set are known).
    def features(t, with_support):
        tid = t["task_id"]
        starts = np.flatnonzero(np.r_[True, tid[1:] != tid[:-1]])
        sizes = np.diff(np.r_[starts, len(tid)])
        sup = 1.0 - t["is_query"]
        clicks = np.repeat(np.add.reduceat(t["click"] * sup, starts), sizes)
        n_sup = np.repeat(np.add.reduceat(sup, starts), sizes)
        cat = t["item_category"]
        fields = [t["age"], t["gender"], t["occupation"], t["item_id"], cat,
                  t["age"] * 24 + cat, t["gender"] * 24 + cat, t["occupation"] * 24 + cat]
        sizes_ = [7, 2, 21, 1250, 24, 7 * 24, 2 * 24, 21 * 24]
        offsets = np.cumsum([0] + sizes_[:-1])
        idx = np.stack([f + o for f, o in zip(fields, offsets)], 1)
        dense = [t["user_activity"], np.log(t["item_price"])]
        if with_support:
            dense.append(np.log((clicks + 1) / (n_sup - clicks + 1)))
        q = t["is_query"] == 1
        return idx[q], np.stack(dense, 1)[q], t["click"][q], int(sum(sizes_))

    def fit_and_score(with_support):
        idx, dense, y, n_cat = features(data["train"], with_support)
        w, v, b = np.zeros(n_cat), np.zeros(dense.shape[1]), 0.0
        m = [np.zeros(n_cat), np.zeros(dense.shape[1]), 0.0]
        s = [np.zeros(n_cat), np.zeros(dense.shape[1]), 0.0]
        for step in range(1, 301):   # Adam, full batch
            g = (1 / (1 + np.exp(-(w[idx].sum(1) + dense @ v + b))) - y) / len(y)
            grads = [np.bincount(idx.ravel(), np.repeat(g, idx.shape[1]), n_cat) + 1e-4 * w, dense.T @ g, g.sum()]
            params = [w, v, b]
            for k in range(3):
                m[k] = 0.9 * m[k] + 0.1 * grads[k]
                s[k] = 0.999 * s[k] + 0.001 * grads[k] ** 2
                params[k] = params[k] - 0.05 * (m[k] / (1 - 0.9 ** step)) / (np.sqrt(s[k] / (1 - 0.999 ** step)) + 1e-8)
            w, v, b = params
        idx, dense, y, _ = features(data["user_cold"], with_support)
        return auc(w[idx].sum(1) + dense @ v + b, y)

    t = data["user_cold"]
    q = t["is_query"] == 1
    oracle = auc(t["p_click"][q], t["click"][q])
    side_only, with_support = fit_and_score(False), fit_and_score(True)
    assert 0.55 < side_only < oracle - 0.08, (side_only, oracle)
    assert with_support > side_only + 0.02, (with_support, side_only)


def test_cold_ids_never_in_train(default_data):
    """New users and new items get ids never used in train; item_cold reuses train users with
    identical side features, its support is warm and its query items are all new."""
    _, data = default_data
    train = data["train"]
    warm_users, warm_items = set(train["user_id"]), set(train["item_id"])
    assert max(warm_users) < 2500 and max(warm_items) < 1000
    for split in ("user_cold", "user_item_cold"):
        assert not set(data[split]["user_id"]) & warm_users
        assert min(data[split]["user_id"]) >= 2500
    assert not set(data["user_cold"]["user_id"]) & set(data["user_item_cold"]["user_id"])
    # val: held-out users of the training population, ids after every other user's, warm items only
    val = data["val"]
    assert set(val["user_id"]) == set(range(3300, 3340)) and np.array_equal(val["task_id"], val["user_id"])
    assert max(val["item_id"]) < 1000
    for split in ("item_cold", "user_item_cold"):
        t = data[split]
        q = t["is_query"] == 1
        assert min(t["item_id"][q]) >= 1000 and not set(t["item_id"][q]) & warm_items
        assert max(t["item_id"][~q]) < 1000
    assert max(data["user_cold"]["item_id"]) < 1000
    ic = data["item_cold"]
    assert set(ic["user_id"]) <= warm_users
    side = {}
    for k in range(len(train["user_id"])):
        side.setdefault(train["user_id"][k], (train["age"][k], train["gender"][k], train["occupation"][k],
                                              train["user_activity"][k]))
    for k in range(0, len(ic["user_id"]), 7):
        assert side[ic["user_id"][k]] == (ic["age"][k], ic["gender"][k], ic["occupation"][k], ic["user_activity"][k])


def test_reader_reads_it(default_data):
    """MetaReader yields every task of the user_cold split with its 10 query rows."""
    from gmeta.io.reader import MetaReader

    d, data = default_data
    t = data["user_cold"]
    r = MetaReader(d, split="user_cold", tasks_per_batch=32, support_size=40, query_size=10, shuffle=True, seed=3)
    assert r.num_tasks == 400 and r.steps_per_epoch == 13
    seen, rows = [], 0.0
    for batch in r.dataset(epoch=0):
        m = batch["task_mask"].numpy() > 0
        seen += batch["task_id"].numpy()[m].tolist()
        assert np.all(batch["query"]["mask"].numpy()[m].sum(1) == 10)
        rows += batch["query"]["mask"].numpy()[m].sum() + batch["support"]["mask"].numpy()[m].sum()
        assert batch["support"]["item_tags"].shape[-1] == 4
    assert sorted(seen) == sorted(np.unique(t["task_id"]).tolist()) and rows == len(t["task_id"])
    assert r.stats["truncated_tasks"] == 0
    v = MetaReader(d, split="val", tasks_per_batch=16, support_size=40, query_size=10, shuffle=False)
    ids = np.concatenate([b["task_id"][b["task_mask"] > 0] for b in v.numpy_batches(0)])
    assert v.num_tasks == 40 and sorted(ids.tolist()) == list(range(3300, 3340))


def _tree(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def test_same_seed_byte_identical(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    for d, seed in ((a, "5"), (b, "5"), (c, "6")):
        assert gmeta(["datagen", "--out", d, "--seed", seed, "--quiet"] + SMALL) == 0
    ta, tb, tc = _tree(a), _tree(b), _tree(c)
    assert sorted(ta) == sorted(tb) and any(k.endswith(".orc") for k in ta)
    for k in ta:
        assert ta[k] == tb[k], f"{k} differs between two runs with the same seed"
    assert ta["train/part-00000.orc"] != tc["train/part-00000.orc"]


def test_streams_in_chunks(tmp_path):
    """Rows are made chunk by chunk: each chunk holds at most --chunk-users whole tasks, the
    chunks cover the split exactly, and peak numpy memory follows the chunk, not the split."""
    cfg = dg.DatagenConfig(out=str(tmp_path), train_users=2000, cold_users=0, chunk_users=100).validate()
    world = dg.World(cfg)
    spec = dg.split_specs(cfg)[0]
    ids = []
    for cols in dg.iter_split(world, spec):
        users = np.unique(cols["task_id"])
        assert len(users) <= 100
        ids.append(users)
    assert len(ids) == 20 and np.array_equal(np.concatenate(ids), np.arange(2000))

    def peak(chunk_users):
        c = dg.DatagenConfig(out=str(tmp_path), train_users=2000, cold_users=0, chunk_users=chunk_users).validate()
        w = dg.World(c)
        schema = dg.build_schema(c)
        tracemalloc.start()
        rows = 0
        for cols in dg.iter_split(w, dg.split_specs(c)[0]):
            rows += arrow_table(schema, cols).num_rows
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p, rows

    peak(100)   # warm-up: first-call allocations (lazy imports, caches) are not the data's
    small, rows_small = peak(100)
    big, rows_big = peak(2000)
    assert rows_small > 60_000 and rows_big > 60_000
    assert small < big / 5, (small, big)
    # and through the CLI: several stripes, every row written
    d = str(tmp_path / "cli")
    assert gmeta(["datagen", "--out", d, "--quiet", "--train-users", "2000", "--cold-users", "0",
                  "--chunk-users", "100", "--rows-per-stripe", "4096"]) == 0
    index = json.loads(open(os.path.join(d, "train", "_index.json")).read())
    assert index["tasks"] == 2000 and sum(len(f["stripes"]) for f in index["files"]) >= 10
    assert Schema.load(d).splits == ("train",)


def test_summary_aucs_are_the_metrics_auc_on_bounded_memory():
    """The summary's AUCs are gmeta.trainer.evaluation.metrics (pooled ``auc``; GAUC from ``per_task_metrics``
    + ``summarize``) over all query rows; past ``sample_rows`` over a uniform, seeded sample of
    whole tasks whose pool stays below 1.25 times that size. The posterior scorer sees whole tasks
    (support rows too) and only those that can still make the sample."""
    from gmeta.trainer.evaluation.metrics import auc as metrics_auc, per_task_metrics, summarize

    rng = np.random.default_rng(0)
    chunks = []
    for c in range(20):
        p = rng.random(1000).astype(np.float32)
        click = (rng.random(1000) < p).astype(np.float32)
        chunks.append({"task_id": np.repeat(np.arange(100 * c, 100 * c + 100), 10),
                       "is_query": (np.arange(1000) % 10 >= 5).astype(np.int8), "click": click,
                       "conversion": click * (rng.random(1000) < 0.5), "rating": np.full(1000, 3, np.float32),
                       "p_click": p, "p_ctcvr": p / 2, "side_logit": p + rng.standard_normal(1000)})
    def scorer(seen):   # a stand-in posterior: records the rows it is given, scores query rows
        def posterior(cols):
            assert np.all(np.unique(cols["task_id"], return_counts=True)[1] == 10), "whole tasks"
            seen.append(len(cols["task_id"]))
            q = cols["is_query"] == 1
            return cols["p_click"][q] ** 2 + 0.1 * cols["side_logit"][q]
        return posterior

    seen_full, seen_small = [], []
    full = dg.SplitStats(np.random.default_rng(1), posterior=scorer(seen_full))
    small = [dg.SplitStats(np.random.default_rng(1), sample_rows=1000, posterior=scorer(seen))
             for seen in (seen_small, [])]
    for cols in chunks:
        for stats in [full] + small:
            stats.add(cols)
        assert small[0].query.held <= 1250
    q = {k: np.concatenate([c[k][c["is_query"] == 1] for c in chunks])
         for k in ("task_id", "p_click", "click", "p_ctcvr", "conversion", "side_logit")}
    q["posterior"] = q["p_click"] ** 2 + 0.1 * q["side_logit"]
    exact = full.summary()
    assert set(exact) == {"users", "rows", "query_rows", "mean_support_rows", "ctr", "cvr", "mean_rating",
                          "oracle_auc_ctcvr", "oracle_auc_click", "oracle_gauc_click", "posterior_oracle_auc_click",
                          "posterior_oracle_gauc_click", "side_only_auc_click", "side_only_gauc_click"}
    assert (exact["users"], exact["rows"], exact["query_rows"], exact["mean_rating"]) == (2000, 20000, 10000, 3.0)
    assert exact["mean_support_rows"] == 5.0
    for name, column in (("oracle", "p_click"), ("posterior_oracle", "posterior"), ("side_only", "side_logit")):
        assert exact[f"{name}_auc_click"] == round(metrics_auc(q[column], q["click"]), 6)
        gauc = summarize(per_task_metrics(q["task_id"], q[column], q["click"], probabilities=False), n_boot=0)
        assert exact[f"{name}_gauc_click"] == round(gauc["gauc"]["value"], 6)
    assert exact["oracle_auc_ctcvr"] == round(metrics_auc(q["p_ctcvr"], q["conversion"]), 6)
    sampled = small[0].summary()
    rows = small[0].query.rows()
    assert len(rows["click"]) == 1000 and sampled == small[1].summary()
    assert np.all(np.bincount(rows["task_id"])[np.unique(rows["task_id"])] == 5), "whole tasks only"
    assert abs(sampled["oracle_auc_click"] - exact["oracle_auc_click"]) < 0.05
    assert abs(sampled["side_only_auc_click"] - exact["side_only_auc_click"]) < 0.05
    assert abs(sampled["oracle_gauc_click"] - exact["oracle_gauc_click"]) < 0.05
    assert {k: sampled[k] for k in ("users", "rows", "ctr")} == {k: exact[k] for k in ("users", "rows", "ctr")}
    # once the cut has settled, the posterior runs only on the tasks that can still make the sample
    assert sum(seen_full) == 20_000 and sum(seen_small) < 10_000, seen_small
    without = dg.SplitStats(np.random.default_rng(1))
    without.add(chunks[0])
    assert without.summary()["posterior_oracle_gauc_click"] is None


def test_progress_and_summary(tmp_path, capsys):
    assert gmeta(["datagen", "--out", str(tmp_path / "d")] + SMALL) == 0
    out, err = capsys.readouterr()
    assert "rows written" in err and "rows/s" in err
    assert "oracle" in out and "posterior" in out and "side_only" in out and "user_item_cold" in out
    assert "regime default: support 10..40" in out and "\nval " in out
    splits = json.loads((tmp_path / "d" / "datagen.json").read_text())["splits"]
    # each split's progress ends on its own row count (not a running total), as in the table
    last = {}
    for line in (line for line in err.splitlines() if line.startswith("datagen: ")):
        name, rows = line.split()[1:3]
        last[name] = int(rows.replace(",", ""))
    assert last == {name: s["rows"] for name, s in splits.items()}
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[0] in splits}
    assert {name: int(row[2].replace(",", "")) for name, row in table.items()} == last
    # the conversion column is the oracle's pooled AUC, and says so
    header = next(line.split() for line in out.splitlines() if line.startswith("split "))
    assert "ctcvr" not in header and "oracle_auc_ctcvr" in header
    column = header.index("oracle_auc_ctcvr")
    assert {name: float(row[column]) for name, row in table.items()} == {
        name: round(s["oracle_auc_ctcvr"], 4) for name, s in splits.items()}


def test_sample_distinct_law():
    """Distinct draws follow sequential sampling without replacement, on both code paths
    (draw-and-dedupe rounds, and the exact Gumbel top-k finish)."""
    w = np.array([0.6, 0.3, 0.1])
    pool = dg.Pool(np.cumsum(w), np.log(w))
    rng = np.random.default_rng(0)
    for rounds in (4, 0):
        out = dg.sample_distinct(rng, pool, np.full(100_000, 2), rounds=rounds).reshape(-1, 2)
        assert abs(np.mean(out[:, 0] == 0) - 0.6) < 0.01
        assert abs(np.mean((out[:, 0] == 0) & (out[:, 1] == 1)) - 0.6 * 0.3 / 0.4) < 0.01
        assert abs(np.mean((out[:, 0] == 2) & (out[:, 1] == 1)) - 0.1 * 0.3 / 0.9) < 0.005
    # a steep skew over a pool barely larger than the need still completes, all distinct
    pool, _ = dg._zipf_pool(rng, 50, 4.0)
    out = dg.sample_distinct(rng, pool, np.full(300, 50)).reshape(300, 50)
    assert all(len(set(row)) == 50 for row in out.tolist())


def _task_support_sizes(t) -> np.ndarray:
    tid = t["task_id"]
    starts = np.flatnonzero(np.r_[True, tid[1:] != tid[:-1]])
    return np.add.reduceat(1 - t["is_query"].astype(np.int64), starts)


def test_few_shot_regime(tmp_path):
    """--regime few-shot: support sizes in [1, 20] (small ones common), side effects at half
    strength with the deviation taking their variance (the latent's variance unchanged); a flag
    given explicitly wins over the regime; the summary says what was used."""
    d = str(tmp_path / "few")
    assert gmeta(["datagen", "--out", d, "--quiet", "--regime", "few-shot"] + SMALL) == 0
    settings = json.loads(open(os.path.join(d, "datagen.json")).read())["settings"]
    assert (settings["regime"], settings["support_min"], settings["support_max"], settings["side_strength"]) == \
        ("few-shot", 1, 20, 0.5)
    sizes = {split: _task_support_sizes(read_split(d, split)) for split in SPLITS}
    for split, n in sizes.items():
        assert 1 <= n.min() and n.max() <= 20, (split, n.min(), n.max())
    every = np.concatenate(list(sizes.values()))
    assert every.min() == 1 and every.max() == 20 and np.mean(every <= 5) > 0.1
    d2 = str(tmp_path / "few5")
    assert gmeta(["datagen", "--out", d2, "--quiet", "--regime", "few-shot", "--support-max", "5"] + SMALL) == 0
    assert _task_support_sizes(read_split(d2, "user_cold")).max() <= 5

    worlds = {r: dg.World(dg.DatagenConfig(out="x", regime=r).validate()) for r in ("default", "few-shot")}
    a, b = worlds["default"], worlds["few-shot"]
    np.testing.assert_allclose(b.a_age, 0.5 * a.a_age)           # same draws, half the effect
    assert a.side_var == b.side_var and (a.dev_var, b.dev_var) == (0.6, 0.6 + 0.75 * a.side_var)
    users = [w.users(0, 20_000) for w in (a, b)]
    side, total = ([u[k].var(0).mean() for u in users] for k in ("u_side", "u"))
    assert abs(side[0] - a.side_var) < 0.02 and abs(side[1] - 0.25 * a.side_var) < 0.01, side
    assert abs(total[1] - total[0]) < 0.03, total     # the latent's variance across users is kept


def test_posterior_oracle_wiring_and_ordering(tmp_path):
    """The posterior oracle's logit decomposition reproduces the stored p_click from the true
    (dev, b_u); on a small dataset its GAUC lies between the side-only score's and the full
    oracle's on every evaluation split; it captures much more of that gap with 40-60 support rows
    than with 1-3."""
    cfg = dg.DatagenConfig(out="x", train_users=50, cold_users=300, items=200, cold_items=40).validate()
    w = dg.World(cfg)
    spec = dg.split_specs(cfg)[3]                      # user_item_cold: new users, query on new items
    cols = next(dg.iter_split(w, spec))
    users = w.users(spec.first_user, spec.num_users)
    k = cols["task_id"] - spec.first_user
    theta = np.c_[users["u"] - users["u_side"], users["bias"]][k]
    logit = cols["side_logit"] + np.einsum("rk,rk->r", w.posterior_features(cols["item_id"]), theta)
    np.testing.assert_allclose(dg._sigmoid(logit), cols["p_click"], rtol=1e-6)

    def gaucs(**flags):
        c = dg.DatagenConfig(out="x", train_users=50, cold_users=300, items=200, cold_items=40, **flags).validate()
        world, out = dg.World(c), {}
        for sp in dg.split_specs(c)[1:]:
            stats = dg.SplitStats(np.random.default_rng(0), posterior=world.posterior_click)
            for chunk in dg.iter_split(world, sp):
                stats.add(chunk)
            s = stats.summary()
            out[sp.name] = [s[f"{n}_gauc_click"] for n in ("side_only", "posterior_oracle", "oracle")]
        return out

    default = gaucs()
    for split, (side, post, oracle) in default.items():
        assert side < post < oracle, (split, side, post, oracle)
    few, many = gaucs(support_min=1, support_max=3), gaucs(support_min=40, support_max=60)
    for split in ("user_cold", "user_item_cold"):
        captured = [(post - side) / (oracle - side) for side, post, oracle in (few[split], many[split])]
        assert captured[0] < 0.25 and captured[1] > captured[0] + 0.25, (split, few[split], many[split])


def _grid_posterior(x, off, y, prior_var, half_width=6.0, n=501):
    """Brute force for k = 2: log posterior of theta on a grid of +-half_width prior sds."""
    axes = [np.linspace(-half_width, half_width, n) * np.sqrt(v) for v in prior_var]
    t0, t1 = np.meshgrid(*axes, indexing="ij")
    eta = off[:, None, None] + x[:, 0, None, None] * t0 + x[:, 1, None, None] * t1
    logp = (y[:, None, None] * eta - np.logaddexp(0.0, eta)).sum(0) \
        - 0.5 * (t0 ** 2 / prior_var[0] + t1 ** 2 / prior_var[1])
    return t0, t1, logp


def test_laplace_map_and_predictive_match_a_grid_posterior():
    """d = 1 (theta = (dev, b_u), k = 2), three users in one batched call with 0, 6 and 40 support
    rows, checked by brute force on a grid: the MAP is the grid posterior's mode, the Hessian is
    the log posterior's curvature there (finite differences), the predictive is the Gaussian
    N(MAP, Hessian^-1) integral of the sigmoid (on the grid) to the probit approximation's 0.01,
    and it ranks query rows as the exact posterior-mean probability does, which it matches to 0.05
    (Laplace's skew error: a handful of clicks leave the posterior skewed). No support: the prior."""
    rng = np.random.default_rng(3)
    prior_var = np.array([0.6, 1.0])
    n_rows = np.array([0, 6, 40])
    x = np.c_[1.6 * rng.standard_normal(n_rows.sum()), np.ones(n_rows.sum())]
    off = rng.normal(-1.0, 0.8, n_rows.sum())
    true = np.repeat(np.array([[0.0, 0.0], [0.9, -0.5], [-1.1, 0.8]]), n_rows, axis=0)
    y = (rng.random(n_rows.sum()) < dg._sigmoid(off + (x * true).sum(1))).astype(np.float64)
    theta, hess = dg.laplace_posterior(x, off, y, n_rows, prior_var)
    xq = np.c_[1.6 * np.linspace(-2, 2, 9), np.ones(9)]
    offq = np.linspace(-2, 1, 9)
    starts = np.r_[0, np.cumsum(n_rows)]
    for j in range(3):
        rows = slice(starts[j], starts[j + 1])
        t0, t1, logp = _grid_posterior(x[rows], off[rows], y[rows], prior_var)
        mode = np.unravel_index(np.argmax(logp), logp.shape)
        step = np.array([t0[1, 0] - t0[0, 0], t1[0, 1] - t1[0, 0]])
        assert np.all(np.abs(theta[j] - [t0[mode], t1[mode]]) <= step), (j, theta[j], t0[mode], t1[mode])

        def neg_logpost(t):
            eta = off[rows] + x[rows] @ t
            return -(y[rows] * eta - np.logaddexp(0.0, eta)).sum() + 0.5 * (t * t / prior_var).sum()
        h, e = 1e-4, np.eye(2)
        fd = np.array([[(neg_logpost(theta[j] + h * (e[a] + e[b])) - neg_logpost(theta[j] + h * (e[a] - e[b]))
                         - neg_logpost(theta[j] - h * (e[a] - e[b])) + neg_logpost(theta[j] - h * (e[a] + e[b])))
                        / (4 * h * h) for b in range(2)] for a in range(2)])
        np.testing.assert_allclose(hess[j], fd, rtol=1e-4, atol=1e-6)
        laplace = dg.laplace_predictive(theta, hess, xq, offq, np.full(9, j))
        d = np.stack([t0 - theta[j][0], t1 - theta[j][1]], -1)
        gauss = np.exp(-0.5 * np.einsum("...a,ab,...b->...", d, hess[j], d))
        gauss /= gauss.sum()
        post = np.exp(logp - logp.max())
        post /= post.sum()
        for weights, tol in ((gauss, 0.01), (post, 0.05)):
            want = np.array([(weights * dg._sigmoid(o + a * t0 + b * t1)).sum() for (a, b), o in zip(xq, offq)])
            np.testing.assert_allclose(laplace, want, atol=tol, err_msg=f"user {j}")
            assert np.array_equal(np.argsort(laplace), np.argsort(want))
    np.testing.assert_array_equal(theta[0], [0.0, 0.0])       # no support: the prior
    np.testing.assert_allclose(hess[0], np.diag(1 / prior_var))


def test_val_split_leaves_the_other_splits_unchanged(tmp_path):
    """The val split (default --cold-users // 10 users) adds new ids after every other user's and
    its own random streams: every other split's files are byte-identical to a run with
    --val-users 0, which writes no val split; the schema's user table grows by the val users."""
    a, b = str(tmp_path / "with"), str(tmp_path / "without")
    assert gmeta(["datagen", "--out", a, "--quiet"] + SMALL) == 0
    assert gmeta(["datagen", "--out", b, "--quiet", "--val-users", "0"] + SMALL) == 0
    ta, tb = _tree(a), _tree(b)
    others = [k for k in tb if k.split(os.sep)[0] in SPLITS[:4]]
    assert len(others) == 8 and all(ta[k] == tb[k] for k in others)
    assert sorted(set(ta) - set(tb)) == ["val/_index.json", "val/part-00000.orc"]
    sa, sb = Schema.load(a), Schema.load(b)
    assert sa.splits == SPLITS and sb.splits == SPLITS[:4]
    assert sa.table("user_id").num_rows == sb.table("user_id").num_rows + 6 == 300 + 120 + 6
    val, train = read_split(a, "val"), read_split(a, "train")
    assert set(val["user_id"]) == set(range(420, 426)) and not set(val["user_id"]) & set(train["user_id"])
    summary = json.loads(open(os.path.join(a, "datagen.json")).read())
    assert summary["settings"]["val_users"] == 6 and summary["splits"]["val"]["users"] == 6
    # train only plus val
    c = str(tmp_path / "trainval")
    assert gmeta(["datagen", "--out", c, "--quiet", "--cold-users", "0", "--val-users", "7"] + SMALL[:2]
                 + SMALL[4:]) == 0
    assert Schema.load(c).splits == ("train", "val") and len(set(read_split(c, "val")["user_id"])) == 7


CONVERT = ("convert", "movielens", "--src", "raw")   # flags are checked before --src is read


@pytest.mark.parametrize("command, flags, message", [
    (("datagen",), ["--support-min", "0"], "--support-min must be >= 1"),
    (("datagen",), ["--support-min", "30", "--support-max", "20"], "--support-max must be >= --support-min"),
    (("datagen",), ["--items", "30"], "--items must be >= --support-max + --query-size"),
    (("datagen",), ["--cold-items", "5"], "--cold-items must be >= --query-size"),
    (("datagen",), ["--query-size", "0"], "--query-size must be >= 1"),
    (("datagen",), ["--zipf", "-1"], "--zipf must be in [0, 5]"),
    (("datagen",), ["--zipf", "nan"], "--zipf must be in [0, 5]"),
    (("datagen",), ["--rows-per-stripe", "20"], "--rows-per-stripe must hold the largest task"),
    (("datagen",), ["--compression", "gzip"], "--compression must be one of"),
    (("datagen",), ["--train-users", "0"], "--train-users must be >= 1"),
    (("datagen",), ["--latent-dim", "0"], "--latent-dim must be in [1, 256]"),
    (("datagen",), ["--chunk-users", "0"], "--chunk-users must be >= 1"),
    (("datagen",), ["--seed", "-3"], "--seed must be >= 0"),
    (("datagen",), ["--val-users", "-1"], "--val-users must be >= 0"),
    (("datagen",), ["--side-strength", "1.5"], "--side-strength must be in [0, 1]"),
    (("datagen",), ["--regime", "few-shot", "--support-min", "25"], "--support-max must be >= --support-min (25)"),
    (("datagen",), ["--regime", "few-shot", "--rows-per-stripe", "29"], "--rows-per-stripe must hold the largest task"),
    (CONVERT, ["--query-size", "0"], "--query-size must be >= 1"),
    (CONVERT, ["--min-ratings", "10"], "--min-ratings must exceed --query-size"),
    (CONVERT, ["--max-ratings", "12"], "--max-ratings must be >= --min-ratings"),
    (CONVERT, ["--cold-user-frac", "1.5"], "--cold-user-frac must be in [0, 1)"),
    (CONVERT, ["--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    (CONVERT, ["--seed", "-1"], "--seed must be >= 0"),
    (CONVERT, ["--compression", "gzip"], "--compression must be one of"),
], ids=lambda v: v[0] if isinstance(v, (tuple, list)) else None)   # e.g. "datagen---zipf---zipf must..."
def test_bad_flags_are_named(tmp_path, capsys, command, flags, message):
    """Every dataset-producing command (datagen, convert movielens) names the bad flag, writes nothing."""
    assert gmeta([*command, "--out", str(tmp_path / "d")] + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_non_numeric_flag_and_existing_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gmeta(["datagen", "--out", str(tmp_path / "d"), "--seed", "abc"])
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        gmeta(["datagen", "--out", str(tmp_path / "d"), "--regime", "many-shot"])
    assert exc.value.code == 2 and "--regime: invalid choice" in capsys.readouterr().err
    # a misspelled flag or command: one line with the closest name, no usage dump
    for argv, message in ((["datagen", "--out", str(tmp_path / "d"), "--sed", "1"],
                           "gmeta datagen: unknown flag --sed (did you mean --seed?); see gmeta datagen --help\n"),
                          (["datagen", "--out", str(tmp_path / "d"), "1"],
                           "gmeta datagen: unexpected argument '1'; see gmeta datagen --help\n"),
                          (["datgen", "--out", "x"], "gmeta: unknown command 'datgen' (did you mean datagen?); see "
                                                     "gmeta --help\n")):
        with pytest.raises(SystemExit) as exc:
            gmeta(argv)
        assert exc.value.code == 2 and capsys.readouterr().err == message
    d = str(tmp_path / "d")
    assert gmeta(["datagen", "--out", d, "--quiet"] + SMALL) == 0
    assert gmeta(["datagen", "--out", d, "--quiet"] + SMALL) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert gmeta(["datagen", "--out", d, "--quiet", "--overwrite", "--seed", "1"] + SMALL) == 0
    assert json.loads(open(os.path.join(d, "datagen.json")).read())["settings"]["seed"] == 1
