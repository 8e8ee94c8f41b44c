"""The daily loop, end to end: three days of a team's events (new users and items every day), each
day converted with `--vocab-from` the previous day's dataset, trained with `--init-from` the
champion, and promoted only when the rule says so; then the champion scores raw ids, a user it
never saw among them. Real files, a real sqlite MLflow store, real gmeta subprocesses: the
pieces were built apart, this proves they fit together."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import last_json, run_gmeta, train_report

from gmeta.io.vocab import load_vocabularies
from gmeta.trainer.evaluation.promotion import decide

DAY = 86400
T0 = 1_700_000_000
NAME = "daily"
MIN_GAIN = 0.002
SPEC = {"input": "events.parquet", "task": {"column": "user", "kind": "user"}, "order": ["ts", "item"],
        "query": {"last": 5}, "min_events": 8, "labels": {"click": "click"},
        "join": [{"path": "items.parquet", "on": "item"}],
        "sparse": [{"name": "user_id", "column": "user", "group": "user"},
                   {"name": "item_id", "column": "item", "group": "item"},
                   {"name": "genre", "column": "genre", "group": "item"}],
        "item_id_feature": "item_id", "cold": {"users": {"fraction": 0.3}}, "val_fraction": 0.1, "seed": 0}
TRAIN = ["--model", "maml_dnn", "--epochs", "1", "--tasks-per-batch", "8", "--log-every", "0",
         "--plain-baseline", "off", "--eval-splits", "user_cold", "--validation-split", "none",
         "--checkpoint-dir", "none", "--support-curve", "none"]


def events(seed: int = 0, users: int = 240, items: int = 90, genres: int = 3):
    """Three days of clicks: users arrive through the days, each with a taste for one genre (80%
    clicks on it, 15% elsewhere: what adaptation on the support rows can learn); 50 items exist
    from the start, 40 more appear on days 1-3. String ids, as a team's logs have them."""
    rng = np.random.default_rng(seed)
    arrive = T0 + np.sort(rng.uniform(0, 2.7 * DAY, users))
    released = T0 + np.concatenate([np.zeros(50), np.sort(rng.uniform(0.5 * DAY, 2.6 * DAY, items - 50))])
    taste, genre = rng.integers(0, genres, users), rng.integers(0, genres, items)
    rows = []
    for u in range(users):
        for t in np.sort(arrive[u] + rng.uniform(0, 0.25 * DAY, rng.integers(12, 20))):
            it = int(rng.choice(np.flatnonzero(released <= t)))
            p = 0.8 if genre[it] == taste[u] else 0.15
            rows.append((f"u{u:04d}", f"i{it:04d}", int(t), float(rng.random() < p)))
    frame = pd.DataFrame(rows, columns=["user", "item", "ts", "click"])
    side = pd.DataFrame({"item": [f"i{i:04d}" for i in range(items)], "genre": [f"g{g}" for g in genre]})
    return frame, side


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Each day's input: every event up to that day's end (a team's rolling window), the items file."""
    root = tmp_path_factory.mktemp("daily")
    frame, side = events()
    (root / "spec.json").write_text(json.dumps(SPEC))
    for day in (1, 2, 3):
        d = root / f"events-day{day}"
        d.mkdir()
        pq.write_table(pa.Table.from_pandas(frame[frame.ts < T0 + day * DAY], preserve_index=False),
                       d / "events.parquet")
        pq.write_table(pa.Table.from_pandas(side, preserve_index=False), d / "items.parquet")
    return root


def _alias_version(client) -> int:
    return int(client.get_model_version_by_alias(NAME, "champion").version)


# slow tier: 74 s, and each piece has its fast test (convert, --vocab-from, --init-from growing
# tables, promote, raw ids in the SavedModel and gmeta predict)
@pytest.mark.slow
def test_three_days_convert_warm_start_promote_and_serve_raw_ids(days):
    from mlflow import MlflowClient

    root = days
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    trained_on = {}     # model version -> its dataset: the champion's tables are its dataset's vocabularies
    decisions = []
    for day in (1, 2, 3):
        data = root / f"day{day}"
        vocab_from = ["--vocab-from", root / f"day{day - 1}"] if day > 1 else []
        run_gmeta("convert", "table", "--spec", root / "spec.json", "--src", root / f"events-day{day}",
                  "--out", data, *vocab_from, "--quiet", cwd=root)
        if day > 1:     # every raw id keeps its row; the new users and items are appended
            before, after = load_vocabularies(str(root / f"day{day - 1}")), load_vocabularies(str(data))
            for table in ("user_id", "item_id", "genre"):
                old, new = before[table], after[table]
                assert new.values.slice(0, old.size).equals(old.values), table
                assert new.previous == old.version, table
            assert after["user_id"].size > before["user_id"].size and after["item_id"].size > before["item_id"].size

        init = ["--init-from", f"models:/{NAME}@champion"] if day > 1 else []
        proc = proc_train = run_gmeta("train", "--data", data, "--tracking-uri", uri, "--output-dir",
                                      root / "runs", *TRAIN, *init, cwd=root)
        run_id = last_json(proc)["run_id"]
        if day > 1:     # the champion's rows are loaded, today's new ids start from their initial rows
            champion = load_vocabularies(str(trained_on[_alias_version(client)]))
            today = load_vocabularies(str(data))
            for table in ("user_id", "item_id"):
                old, new = champion[table].size, today[table].size
                assert f"table {table}: {old:,} rows loaded, {new - old:,} new rows initialised" in proc.stderr, \
                    proc.stderr[-3000:]

        proc = run_gmeta("promote", "--run", run_id, "--name", NAME, "--tracking-uri", uri,
                         "--min-gain", MIN_GAIN, cwd=root)
        out = last_json(proc)
        trained_on[out["challenger_version"]] = data
        assert out["challenger_version"] == day and out["data"] == str(data)
        if day == 1:
            assert out["decision"] == "promoted" and out["champion_version"] is None
            assert out["challenger_value"] == pytest.approx(train_report(proc_train)["user_cold"]["gauc_adapted"],
                                                            abs=1e-4)
        else:   # the champion was scored on today's tasks (its unseen ids on the OOV row), paired
            assert out["tasks"] > 0 and out["gain"] == pytest.approx(out["challenger_value"] - out["champion_value"])
            assert out["lo"] <= out["gain"] <= out["hi"]
            want = decide(out["gain"], out["lo"], MIN_GAIN).promote
            assert out["decision"] == ("promoted" if want else "kept"), out
            assert out["champion_version"] == decisions[-1]["alias_version"]
        assert _alias_version(client) == out["alias_version"]
        assert out["alias_version"] == (out["challenger_version"] if out["decision"] == "promoted"
                                        else out["champion_version"])
        assert client.get_model_version(NAME, str(day)).tags["gmeta.promote.decision"] == out["decision"]
        decisions.append(out)

    # the champion, whichever day made it, scores raw ids: a user no day has seen, an item it never saw
    items = load_vocabularies(str(trained_on[_alias_version(client)]))["item_id"].values.to_pylist()[1:]
    support, query = items[:6], items[6:9] + ["i-never-seen"]
    rows = []
    for task, liked in ((0, 1.0), (1, 0.0)):   # one new user twice, with opposite support labels
        rows += [(task, 0, "u-new-today", it, "g0", liked if k % 2 == 0 else 1 - liked) for k, it in enumerate(support)]
        rows += [(task, 1, "u-new-today", it, "g0", 0.0) for it in query]
    frame = pd.DataFrame(rows, columns=["task_id", "is_query", "user_id", "item_id", "genre", "click"])
    frame.to_parquet(root / "request.parquet")
    run_gmeta("predict", "--model", f"models:/{NAME}@champion", "--tracking-uri", uri, "--input",
              root / "request.parquet", "--out", root / "scored.parquet", cwd=root)
    scored = pq.read_table(root / "scored.parquet").to_pandas()
    q = scored[scored.is_query == 1]
    assert len(q) == 8 and np.isfinite(q.score_adapted).all() and np.isfinite(q.score_unadapted).all()
    assert scored[scored.is_query == 0].score_adapted.isna().all()
    first, second = (q[q.task_id == t] for t in (0, 1))
    # before adapting, the unseen user is the same user; after, the support labels moved the scores
    np.testing.assert_allclose(first.score_unadapted.to_numpy(), second.score_unadapted.to_numpy(), rtol=1e-5)
    assert np.abs(first.score_adapted.to_numpy() - second.score_adapted.to_numpy()).max() > 1e-4
