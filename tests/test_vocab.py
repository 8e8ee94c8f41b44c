"""Vocabularies: raw ids -> rows, row 0 for what was never seen, stable across days."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmeta.io.errors import DataError
from gmeta.io.vocab import OOV_ROW, ValueCounter, Vocabulary, keeps_rows, kind_of, load_vocabularies, save_vocabularies
from gmeta.trainer.checkpoint.init_from import vocabulary_problem


def test_build_maps_sorted_values_after_the_oov_row_and_unknowns_to_it():
    v = Vocabulary.build("user", pa.array(["u9", "u1", "u5"]), "string")
    assert v.size == 4 and v.values.to_pylist() == [None, "u1", "u5", "u9"]
    assert v.rows(pa.array(["u5", "nobody", None, "u1", "u9"])).tolist() == [2, OOV_ROW, OOV_ROW, 1, 3]


def test_extend_keeps_every_known_row_and_appends_new_values():
    day1 = Vocabulary.build("item", pa.array([30, 10, 20]), "int")
    day2 = day1.extend(pa.array([25, 10, 99, 25]))
    assert day2.values.to_pylist() == [None, 10, 20, 30, 25, 99]
    old = pa.array([10, 20, 30])
    assert (day2.rows(old) == day1.rows(old)).all()
    assert day2.previous == day1.version and day2.version != day1.version


def test_counter_over_batches_applies_the_minimum_count():
    c = ValueCounter("string")
    rng = np.random.default_rng(0)
    batches = [pa.array(rng.choice(["a", "b", "c", "d"], 50, p=[0.5, 0.3, 0.19, 0.01])) for _ in range(100)]
    for b in batches:
        c.add(b)
    every = np.concatenate([b.to_numpy(zero_copy_only=False) for b in batches])
    values, counts = np.unique(every, return_counts=True)
    assert dict(zip(c.counts().column("value").to_pylist(), c.counts().column("count").to_pylist())) == \
        dict(zip(values.tolist(), counts.tolist()))
    assert c.frequent(100).to_pylist() == sorted(values[counts >= 100].tolist())


def test_saved_vocabularies_load_back_and_a_modified_one_is_refused(tmp_path):
    vocabs = {"user": Vocabulary.build("user", pa.array(["x", "y"]), "string"),
              "item": Vocabulary.build("item", pa.array([7, 3]), "int").extend(pa.array([5]))}
    save_vocabularies(str(tmp_path), vocabs)
    back = load_vocabularies(str(tmp_path))
    assert {k: (v.kind, v.values.to_pylist(), v.previous) for k, v in back.items()} == \
        {k: (v.kind, v.values.to_pylist(), v.previous) for k, v in vocabs.items()}
    assert load_vocabularies(str(tmp_path / "nothing")) == {}
    pq.write_table(pa.table({"value": pa.array([None, "x"])}), str(tmp_path / "_vocab" / "user.parquet"))
    with pytest.raises(DataError, match="user.parquet.*dataset was modified"):
        load_vocabularies(str(tmp_path))


def test_only_strings_and_integers_are_ids():
    assert kind_of(pa.array(["a"])) == "string" and kind_of(pa.array([1], pa.int32())) == "int"
    assert kind_of(pa.array(["a"]).dictionary_encode()) == "string"
    with pytest.raises(DataError, match="column 'price'.*cannot hold ids"):
        kind_of(pa.array([1.5]), "price")


def test_a_vocabulary_built_afresh_does_not_keep_yesterdays_rows():
    """Only an extension keeps every known id on its row: the condition warm starts and promote check."""
    day1 = Vocabulary.build("item", pa.array(["b", "d"]), "string")
    extended = day1.extend(pa.array(["a", "c"]))
    afresh = Vocabulary.build("item", pa.array(["a", "b", "c", "d"]), "string")
    assert keeps_rows(day1, day1) and keeps_rows(day1, extended)
    assert not keeps_rows(day1, afresh) and not keeps_rows(extended, day1)
    assert not keeps_rows(Vocabulary.build("item", pa.array([1]), "int"), Vocabulary.build("item", pa.array(["1"]), "string"))
    assert vocabulary_problem("item", {"item": day1}, {"item": extended}) is None
    assert vocabulary_problem("item", {"item": day1}, {}) is None   # nothing to check against
    problem = vocabulary_problem("item", {"item": day1}, {"item": afresh})
    assert "table item" in problem and "--vocab-from" in problem
