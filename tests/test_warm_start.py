"""Warm starts onto a grown vocabulary: a daily retrain's dataset has the same tables with more
rows (every known id keeps its row, new ids are appended), and `gmeta train --init-from SOURCE`
starts from the source's rows in their places while the new rows keep the embedding's initial
rows, on any worker count (MetaEmb's new item rows: generated from their side features). A table
that shrank, changed its dimension or its hash bucket count cannot be mapped row for row and is
refused, naming it.

Today's dataset is yesterday's with larger `num_rows` in schema.json (ids past the data's are
never looked up); runs use `--epochs 0`, so a run's export IS its state right after --init-from."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIN, horovodrun, last_json, run_gmeta
from test_daily_loop import SPEC, T0, events

from gmeta.io.vocab import load_vocabularies
from gmeta.trainer.embedding.build import INIT_STDDEV
from gmeta.trainer.embedding.initial import initial_rows

GROWN = {"item_id": 30, "user_id": 20}   # rows appended to yesterday's tables
SIZES = ["--tasks-per-batch", "8", "--support-size", "20", "--query-size", "5"]
FLAGS = ["--model", "maml_dnn", *SIZES, "--no-saved-model", "--log-every", "0", "--eval-splits", "user_cold",
         "--plain-baseline", "off", "--tracking-uri", "none", "--support-curve", "none", "--validation-split", "none"]


def _resized(src: Path, dst: Path, change) -> Path:
    """A copy of dataset ``src`` whose schema's tables were edited by ``change(table dict)``."""
    shutil.copytree(src, dst)
    schema = json.loads((dst / "schema.json").read_text())
    for table in schema["tables"]:
        change(table)
    (dst / "schema.json").write_text(json.dumps(schema, indent=2))
    return dst


def _grow(table):
    table["num_rows"] += GROWN.get(table["name"], 0)


def _hash_tags(table):
    if table["name"] == "tag":
        table["hashed"] = True


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Yesterday's dataset (its tag table hashed, 200 buckets), today's (item_id and user_id
    grown) and one whose tag table has 256 buckets."""
    root = tmp_path_factory.mktemp("warm")
    run_gmeta("datagen", "--out", root / "raw", "--seed", "1", "--train-users", "60", "--cold-users", "10",
              "--items", "60", "--cold-items", "10", "--support-max", "20", "--query-size", "5", "--quiet", cwd=root)
    yesterday = _resized(root / "raw", root / "yesterday", _hash_tags)
    return {"yesterday": yesterday, "today": _resized(yesterday, root / "today", _grow),
            "rebucketed": _resized(yesterday, root / "rebucketed",
                                   lambda t: t.update(num_rows=256) if t["name"] == "tag" else None)}


@pytest.fixture(scope="module")
def source(data, tmp_path_factory):
    """One epoch on yesterday's dataset, one worker: its export and its checkpoints."""
    root = tmp_path_factory.mktemp("source")
    proc = run_gmeta("train", *FLAGS, "--epochs", "1", "--data", data["yesterday"], "--output-dir", root / "runs",
                     "--checkpoint-dir", root / "ckpts", cwd=root)
    return {"export": Path(last_json(proc)["export"]), "ckpts": root / "ckpts"}


def _tables(export: Path) -> dict:
    with np.load(export / "embeddings.npz") as z:
        return {k: z[k] for k in z.files}


def _checkpoint_tables(ckpts: Path) -> dict:
    """Every table of a 1-worker checkpoint's model, whole, ordered by global row."""
    newest = sorted(ckpts.glob("ckpt-*"))[-1]
    with np.load(newest / "shard-00000-of-00001.npz") as z:
        out = {}
        for key in z.files:
            if key.startswith("model/@rows/"):
                name = key[len("model/@rows/"):]
                out[name] = z[f"model/table/{name}"][np.argsort(z[key])]
        return out


def _assert_grown(old: dict, new: dict) -> None:
    """Old rows are the source's bit for bit; new rows are the initial rows of their ids."""
    assert set(old) == set(new)
    for name, before in old.items():
        after = new[name]
        assert after.shape == (before.shape[0] + GROWN.get(name, 0), before.shape[1]), name
        np.testing.assert_array_equal(after[:before.shape[0]], before, err_msg=name)
        fresh = np.arange(before.shape[0], after.shape[0])
        np.testing.assert_array_equal(after[before.shape[0]:],
                                      initial_rows(0, name, fresh, after.shape[1], INIT_STDDEV), err_msg=name)


def _assert_logged(stderr: str) -> None:
    assert "table item_id: 70 rows loaded, 30 new rows initialised" in stderr, stderr[-3000:]
    assert "table user_id: 81 rows loaded, 20 new rows initialised" in stderr
    summary = next(ln for ln in stderr.splitlines() if "--init-from" in ln and "left at initial values" in ln)
    assert "table/item_id" in summary and "table/tag" in summary
    # a dense variable with one value per item row is this run's own (fitted on today's data)
    assert "left at initial values: item_prior (shape [70] there, [100] here)" in summary, summary


@pytest.fixture(scope="module")
def grown_one(data, source, tmp_path_factory):
    """Today's run on one worker, --init-from yesterday's export."""
    root = tmp_path_factory.mktemp("grown_one")
    proc = run_gmeta("train", *FLAGS, "--epochs", "0", "--init-from", source["export"], "--data", data["today"],
                     "--output-dir", root / "runs", cwd=root)
    return proc, Path(last_json(proc)["export"])


def test_init_from_an_export_grows_every_table_on_one_worker(source, grown_one):
    proc, export = grown_one
    _assert_grown(_tables(source["export"]), _tables(export))
    _assert_logged(proc.stderr)
    with np.load(source["export"] / "dense.npz") as a, np.load(export / "dense.npz") as b:
        assert a.files == b.files
        for key in a.files:
            if key != "item_prior":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_init_from_a_one_worker_checkpoint_grows_every_table_on_two_workers(data, source, tmp_path):
    """The source's shard file is re-sharded onto two workers: each rank copies the old rows it
    owns; the new rows are the same initial rows as on one worker."""
    proc = horovodrun(2, [BIN / "gmeta", "train", *FLAGS, "--epochs", "0", "--init-from", source["ckpts"],
                          "--data", data["today"], "--output-dir", tmp_path / "runs"], timeout=240)
    _assert_grown(_checkpoint_tables(source["ckpts"]), _tables(Path(last_json(proc)["export"])))
    _assert_logged(proc.stderr)


def _refused(data_dir, source_dir, tmp_path, *flags) -> str:
    """The stderr of a run refused by --init-from (its own output directory)."""
    proc = run_gmeta("train", *FLAGS, "--epochs", "0", "--init-from", source_dir, "--data", data_dir,
                     "--output-dir", tmp_path / data_dir.name, *flags, cwd=tmp_path, check=False)
    assert f"CheckpointError: --init-from {source_dir}: table" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode != 0, proc.stderr[-3000:]
    return proc.stderr


def test_a_shrunk_table_another_dim_or_other_hash_buckets_are_refused_naming_the_table(data, source, grown_one,
                                                                                     tmp_path):
    today = grown_one[1]
    shrunk = _refused(data["yesterday"], today, tmp_path)
    assert "table item_id shrank ([100, 16] there, [70, 16] here)" in shrunk, shrunk[-3000:]
    assert "table user_id shrank ([101, 16] there, [81, 16] here)" in shrunk
    assert "converted with --vocab-from the previous one" in shrunk
    narrower = _refused(data["today"], source["export"], tmp_path, "--emb-dim", "8")
    assert "table age has another dimension ([7, 16] there, [7, 8] here): train with --emb-dim 16" in narrower, \
        narrower[-3000:]
    rebucketed = _refused(data["rebucketed"], source["export"], tmp_path)
    assert "table tag is hashed and its bucket count changed ([200, 16] there, [256, 16] here)" in rebucketed, \
        rebucketed[-3000:]


# ---------------------------------------------------------------------------------- MetaEmb: generated new rows
@pytest.fixture(scope="module")
def two_days(tmp_path_factory):
    """Day 1 and day 2 of the daily loop's events (new items on day 2, each with a genre from
    the items file), converted with --vocab-from; MetaEmb trained on day 1 (both phases)."""
    root = tmp_path_factory.mktemp("metaemb")
    frame, side = events()
    (root / "spec.json").write_text(json.dumps(SPEC))
    for day in (1, 2):
        d = root / f"events-day{day}"
        d.mkdir()
        pq.write_table(pa.Table.from_pandas(frame[frame.ts < T0 + day * 86400], preserve_index=False),
                       d / "events.parquet")
        pq.write_table(pa.Table.from_pandas(side, preserve_index=False), d / "items.parquet")
        vocab = ["--vocab-from", root / "day1"] if day == 2 else []
        run_gmeta("convert", "table", "--spec", root / "spec.json", "--src", d, "--out", root / f"day{day}",
                  "--quiet", *vocab, cwd=root)
    flags = ["--model", "metaemb", "--tasks-per-batch", "8", "--no-saved-model", "--log-every", "0",
             "--eval-splits", "user_cold", "--plain-baseline", "off", "--tracking-uri", "none",
             "--support-curve", "none", "--validation-split", "none", "--checkpoint-dir", "none"]
    proc = run_gmeta("train", *flags, "--epochs", "1", "--data", root / "day1", "--output-dir", root / "runs",
                     cwd=root)
    return root, flags, Path(last_json(proc)["export"]), side


@pytest.mark.slow  # ~45 s with its fixture (MetaEmb trained on day 1, then a 1- and a 2-worker warm start)
def test_metaemb_warm_start_generates_new_item_rows_from_side_features(two_days, tmp_path):
    """MetaEmb's new item rows start from the source generator's output for each item's genre,
    not from noise: new items of one genre get the one same row, unlike the initial rows; the
    loaded rows are the source's; two workers give one worker's rows."""
    root, flags, source, side = two_days
    exports = {}
    for np_ in (1, 2):
        argv = ["train", *flags, "--epochs", "0", "--init-from", source, "--data", root / "day2",
                "--output-dir", tmp_path / f"np{np_}"]
        proc = (run_gmeta(*argv, cwd=tmp_path) if np_ == 1 else
                horovodrun(2, [BIN / "gmeta", *argv], timeout=240))
        exports[np_] = _tables(Path(last_json(proc)["export"]))
    before = _tables(source)["item_id"]
    after = exports[1]["item_id"]
    old = before.shape[0]
    new_rows = np.arange(old, after.shape[0])
    assert new_rows.size > 0
    assert f"table item_id: {old:,} rows loaded, {new_rows.size:,} new rows initialised ({new_rows.size:,} generated " \
           f"from side features)" in proc.stderr, proc.stderr[-3000:]
    np.testing.assert_array_equal(after[:old], before)
    np.testing.assert_array_equal(exports[2]["item_id"], after)
    genre_of = dict(zip(side["item"], side["genre"]))
    vocab = load_vocabularies(str(root / "day2"))["item_id"].values.to_pylist()
    genres = np.array([genre_of[vocab[r]] for r in new_rows])
    for g in np.unique(genres):
        rows = after[new_rows[genres == g]]
        assert np.all(rows == rows[0]), g
    assert len({tuple(after[r]) for r in new_rows}) == len(np.unique(genres)) > 1
    noise = initial_rows(0, "item_id", new_rows, after.shape[1], INIT_STDDEV)
    assert not np.allclose(after[new_rows], noise)
