"""Raw ids end to end: a dataset whose user, item and tag ids are the team's strings (mapped to rows
by its vocabularies, gmeta.io.vocab) trains as usual; its export carries the vocabularies, and the
SavedModel, `gmeta predict` and the MLflow model over HTTP take the raw ids, scoring an unseen id
on the out-of-vocabulary row exactly as the rows would. Rows they cannot score are refused with
the column named (HTTP 400). Real processes and stores throughout; nothing is mocked."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_gmeta
from test_serving import FLAGS, TOL, _post, mlflow_server, pd_frame

from gmeta.io.schema import Schema, SparseFeature, TableSpec
from gmeta.io.vocab import OOV_ROW, Vocabulary, load_vocabularies, save_vocabularies
from gmeta.io.writer import write_dataset

AGE_ROWS = 8  # the one feature without a vocabulary: its ids are rows
UNSEEN_ITEM = "never-seen-item"
MODEL = "rawids@champion"


def _schema(sizes: dict) -> Schema:
    return Schema(
        labels=("click",),
        sparse=(SparseFeature("user_id", "user_id", group="user"), SparseFeature("age", "age", group="user"),
                SparseFeature("item_id", "item_id", group="item"),
                SparseFeature("item_category", "category", group="item"),
                SparseFeature("item_tags", "tag", max_len=3, group="item")),
        tables=(TableSpec("user_id", sizes["user_id"]), TableSpec("age", AGE_ROWS),
                TableSpec("item_id", sizes["item_id"]), TableSpec("category", sizes["category"]),
                TableSpec("tag", sizes["tag"])),
        item_id_feature="item_id", splits=("train", "user_cold"))


def _events(users: list, seed: int) -> pd.DataFrame:
    """Raw events of ``users``: 6 support and 3 query rows each, items i000..i039 with a
    category (a 64-bit integer id) and tags."""
    rng = np.random.default_rng(seed)
    rows = []
    for t, user in enumerate(users):
        taste = rng.integers(0, 4)
        for pos in range(9):
            item = int(rng.integers(0, 40))
            rows.append({"task_id": t, "is_query": int(pos >= 6), "user_id": user, "age": int(t % AGE_ROWS),
                         "item_id": f"i{item:03d}", "item_category": 10 ** 12 + item % 5,
                         "item_tags": [f"t{(item + k) % 6}" for k in range(item % 4)],
                         "click": float((item % 4 == taste) ^ (rng.random() < 0.2))})
    return pd.DataFrame(rows)


def _rows(events: pd.DataFrame, vocabs: dict) -> pa.Table:
    """The dataset's table of ``events``: raw ids mapped to rows by the vocabularies."""
    tags = events.item_tags.tolist()
    flat = vocabs["tag"].rows(pa.array([t for ts in tags for t in ts], pa.string()))
    offsets = np.r_[0, np.cumsum([len(ts) for ts in tags])]
    return pa.table({"task_id": events.task_id.to_numpy(np.int64), "is_query": events.is_query.to_numpy(np.int8),
                     "click": events.click.to_numpy(np.float32),
                     "user_id": vocabs["user_id"].rows(pa.array(events.user_id)),
                     "age": events.age.to_numpy(np.int64),
                     "item_id": vocabs["item_id"].rows(pa.array(events.item_id)),
                     "item_category": vocabs["category"].rows(pa.array(events.item_category)),
                     "item_tags": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat))})


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    """The dataset (vocabularies built from the train split: cold users are out of vocabulary)
    and the cold split's raw events."""
    out = tmp_path_factory.mktemp("raw_ids") / "data"
    train = _events([f"u{i:03d}" for i in range(96)], seed=0)
    cold = _events([f"cold-{i:02d}" for i in range(24)], seed=1)
    vocabs = {"user_id": Vocabulary.build("user_id", pa.array(train.user_id.unique()), "string"),
              "item_id": Vocabulary.build("item_id", pa.array(train.item_id.unique()), "string"),
              "category": Vocabulary.build("category", pa.array(train.item_category.unique()), "int"),
              "tag": Vocabulary.build("tag", pa.array(sorted({t for ts in train.item_tags for t in ts})), "string")}
    schema = _schema({name: v.size for name, v in vocabs.items()})
    write_dataset(str(out), schema, {"train": _rows(train, vocabs), "user_cold": _rows(cold, vocabs)})
    save_vocabularies(str(out), vocabs)
    return {"dir": out, "cold": cold, "vocabs": vocabs}


@pytest.fixture(scope="module")
def trained(raw_data, tmp_path_factory):
    """MAML-DNN trained one epoch on the dataset, logged to a sqlite store and registered."""
    root = tmp_path_factory.mktemp("raw_ids_run")
    uri = f"sqlite:///{root}/mlflow.db"
    proc = run_gmeta("train", "--model", "maml_dnn", "--data", raw_data["dir"], "--output-dir", root / "runs",
                     "--tracking-uri", uri, "--register-as", MODEL, *FLAGS, cwd=root)
    export = re.search(r"^export: (.+)$", proc.stderr, re.M).group(1)
    return {"root": root, "uri": uri, "export": os.path.join(root, export)}


@pytest.fixture(scope="module")
def cold_rows(raw_data, trained):
    """Raw rows of every cold user, one query row's item never seen in training, and their scores
    through the export's SavedModel (runtime in this process)."""
    from gmeta.trainer.serving.runtime import ServingRuntime

    frame = raw_data["cold"].copy()
    unseen = int(np.flatnonzero(frame.is_query.to_numpy() == 1)[1])
    frame.loc[unseen, "item_id"] = UNSEEN_ITEM
    runtime = ServingRuntime(os.path.join(trained["export"], "saved_model"))
    return {"frame": frame, "unseen": unseen, "scores": runtime.score(runtime.columns_from_frame(frame)),
            "runtime": runtime}


def test_export_carries_the_vocabularies_and_its_saved_model_maps_raw_ids_as_the_rows(raw_data, trained,
                                                                                    cold_rows, tmp_path):
    """The export records which features map through which vocabulary (and its version) and keeps
    a copy; its SavedModel takes raw ids (strings, 64-bit integers, lists of strings) and scores
    them exactly as a SavedModel of the same weights scores the rows, an unseen item as the
    out-of-vocabulary row."""
    import tensorflow as tf

    from gmeta.trainer.serving.runtime import ServingRuntime
    from gmeta.trainer.serving.savedmodel import write_saved_model

    vocabs, export = raw_data["vocabs"], trained["export"]
    meta = json.load(open(os.path.join(export, "gmeta_model.json")))
    table_of = {"user_id": "user_id", "item_id": "item_id", "item_category": "category", "item_tags": "tag"}
    assert meta["vocabularies"] == {f: {"vocabulary": t, "kind": vocabs[t].kind, "version": vocabs[t].version,
                                        "size": vocabs[t].size} for f, t in table_of.items()}  # not age
    assert {t: (v.kind, v.values.to_pylist()) for t, v in load_vocabularies(export).items()} == \
        {t: (v.kind, v.values.to_pylist()) for t, v in vocabs.items()}
    predict = tf.saved_model.load(os.path.join(export, "saved_model")).signatures["predict"]
    inputs = predict.structured_input_signature[1]
    assert {n: (s.dtype, s.shape.rank) for n, s in inputs.items()} == {
        "user_id": (tf.string, 1), "age": (tf.int64, 1), "item_id": (tf.string, 1),
        "item_category": (tf.int64, 1), "item_tags": (tf.string, 2)}

    # the same export without its vocabularies: a SavedModel that takes rows, as before vocabularies
    rows_export = tmp_path / "rows_export"
    shutil.copytree(export, rows_export, ignore=shutil.ignore_patterns("saved_model", "_vocab"))
    meta["vocabularies"] = {}
    (rows_export / "gmeta_model.json").write_text(json.dumps(meta))
    rows_runtime = ServingRuntime(write_saved_model(str(rows_export)))
    rows = _rows(cold_rows["frame"], vocabs).to_pandas()
    assert rows.item_id[cold_rows["unseen"]] == OOV_ROW
    want = rows_runtime.score(rows_runtime.columns_from_frame(rows))
    query = cold_rows["frame"].is_query.to_numpy() == 1
    for name, got in cold_rows["scores"].items():
        assert np.isnan(got[~query]).all() and not np.isnan(got[query]).any()
        np.testing.assert_allclose(got[query], want[name][query], atol=TOL, err_msg=name)
    # the unseen item is scored, differently from the item it replaced
    before = cold_rows["runtime"].score(cold_rows["runtime"].columns_from_frame(raw_data["cold"]))
    assert before["score_unadapted"][cold_rows["unseen"]] != cold_rows["scores"]["score_unadapted"][cold_rows["unseen"]]


def test_gmeta_predict_takes_raw_ids_and_names_a_column_it_cannot_use(trained, cold_rows, tmp_path):
    """`gmeta predict` on a file of raw events gives the SavedModel's scores; a string vocabulary
    given integers, or a negative row id, stops it with one line naming the column."""
    cold_rows["frame"].to_parquet(tmp_path / "rows.parquet")
    run_gmeta("predict", "--model", trained["export"], "--input", tmp_path / "rows.parquet",
              "--out", tmp_path / "scored.parquet", cwd=tmp_path)
    scored = pq.read_table(tmp_path / "scored.parquet").to_pandas()
    assert scored.user_id.tolist() == cold_rows["frame"].user_id.tolist()
    for name, want in cold_rows["scores"].items():
        np.testing.assert_allclose(scored[name].to_numpy(np.float64, na_value=np.nan), want, atol=TOL,
                                   equal_nan=True, err_msg=name)

    bad = {"user_id": (lambda f: f.assign(user_id=f.task_id),
                       "column 'user_id': expected string ids (the raw ids of vocabulary user_id), got integers"),
           "age": (lambda f: f.assign(age=np.where(f.index == 4, -3, f.age)),
                   "column 'age': id -3 is negative (1 of 216 ids); send rows 0..7 of table age")}
    for column, (change, message) in bad.items():
        change(cold_rows["frame"]).to_parquet(tmp_path / f"bad_{column}.parquet")
        proc = run_gmeta("predict", "--model", trained["export"], "--input", tmp_path / f"bad_{column}.parquet",
                         "--out", tmp_path / "never.parquet", cwd=tmp_path, check=False)
        assert proc.returncode == 1
        assert f"[gmeta rank 0] ERROR InputError: {message}\n" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "never.parquet").exists()


def _answer(url: str, frame: pd.DataFrame) -> tuple:
    """POST rows as dataframe_split: (HTTP status, the JSON answer)."""
    data = [[v.tolist() if isinstance(v, np.ndarray) else v for v in row]
            for row in frame.astype(object).itertuples(index=False)]
    try:
        return 200, _post(f"{url}/invocations", {"dataframe_split": {"columns": list(frame.columns), "data": data}})
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_served_model_answers_raw_ids_and_refuses_what_it_cannot_score_with_400(trained, cold_rows):
    """mlflow models serve: raw ids in, the SavedModel's scores out (the unseen item too); a wrong
    type, a negative or out-of-range row id, a support row without its label: HTTP 400 whose
    message names the column."""
    frame = cold_rows["frame"]
    two_users = frame[frame.task_id < 2].reset_index(drop=True)
    with mlflow_server(f"models:/{MODEL}", trained["root"], trained["uri"]) as url:
        status, answer = _answer(url, two_users)
        assert status == 200
        answer = pd_frame(answer)
        query = np.flatnonzero(two_users.is_query.to_numpy() == 1)
        assert answer["row"].tolist() == query.tolist() and cold_rows["unseen"] in query
        for name in ("score_adapted", "score_unadapted"):
            np.testing.assert_allclose(answer[name], cold_rows["scores"][name][query], atol=TOL)

        bad = {  # the first row's value -> what the 400 says
            ("user_id", 7): "column 'user_id': expected string ids (the raw ids of vocabulary user_id), got "
                            "integers mixed with other values",
            ("age", "old"): "Failed to convert column age to type 'int64'",  # MLflow's own check of a long column
            ("age", -3): "column 'age': id -3 is negative (1 of 18 ids); send rows 0..7 of table age",
            ("age", 9999): "column 'age': id 9999 is out of range (table age has 8 rows; 1 of 18 ids): send ids 0..7",
            ("click", None): "column 'click': 1 support rows have no 'click' label",
        }
        for (column, value), message in bad.items():
            rows = two_users.astype({column: object})
            rows.at[0, column] = value
            status, answer = _answer(url, rows)
            assert status == 400 and message in answer["message"], f"{column}={value!r}: {status} {answer}"
    assert "WARNING" not in (trained["root"] / "serve.log").read_text()
