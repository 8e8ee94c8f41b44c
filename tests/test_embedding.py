"""Embedding backends in one process: conformance against plain TF/numpy references.

The same test functions run for every backend (hybrid, naive, sok); sok skips where it cannot
import. Multi-worker runs of the same checks are in test_embedding_dist.py.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import emb_conformance  # noqa: E402
import emb_reference as ref  # noqa: E402

from gmeta.trainer.embedding.factory import RowOptimizerConfig, make_embedding, resolve_mode  # noqa: E402
from gmeta.trainer.embedding.initial import initial_rows  # noqa: E402
from gmeta.trainer.embedding.plan import ShardingPlan, TableConfig  # noqa: E402
from gmeta.trainer.embedding.row_optim import RowOptimizer, slots_per_row  # noqa: E402
from gmeta.trainer.embedding.sok import UNAVAILABLE_REASON, sok_available  # noqa: E402
from gmeta.trainer.parallel.comm import LocalCommunicator, init_communicator  # noqa: E402

#: the row optimizer of the tests that do not sweep optimizers (any kind would do)
OPT = RowOptimizerConfig("adagrad", 0.01)

BACKENDS = ["hybrid", "naive", "sok", "tiered-sparse", "tiered-dense", "mixed"]


def _comm_for(backend):
    if backend == "sok":
        ok, reason = sok_available()
        if not ok:
            pytest.skip(reason)
        return init_communicator("horovod")
    return LocalCommunicator()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _emb(backend, kind="sgd", lr=0.1, plan=None):
    comm = _comm_for(backend)
    plan = plan or ref.plan_for(comm.size)
    return emb_conformance.build(backend, plan, comm, RowOptimizerConfig(kind, lr))


def _full(emb):
    return {t.name: emb.gather_full_table(t.name) for t in emb.plan.tables}


def test_initial_table_does_not_depend_on_world_size():
    """Interleaving the shards of a 2- or 3-way split gives exactly the 1-way table."""
    rows = np.arange(1001)
    full = initial_rows(7, "item", rows, 16, 0.05)
    for n in (2, 3):
        parts = [initial_rows(7, "item", rows[r::n], 16, 0.05) for r in range(n)]
        rebuilt = np.empty_like(full)
        for r, p in enumerate(parts):
            rebuilt[r::n] = p
        np.testing.assert_array_equal(rebuilt, full)
    assert abs(full.mean()) < 0.005 and abs(full.std() - 0.05) < 0.003
    assert not np.array_equal(full, initial_rows(8, "item", rows, 16, 0.05))
    assert not np.array_equal(full, initial_rows(7, "user", rows, 16, 0.05))


def test_lookup_equals_embedding_lookup_any_shape(backend):
    """Eager and traced lookups equal tf.nn.embedding_lookup on the full table, any id shape."""
    emb = _emb(backend)
    full = _full(emb)
    cases = [
        {"item_id": np.array([3, 3, 49, 0]), "hist_items": np.array([[[1, -1], [2, 3]]]),
         "user_id": np.array(10 ** 15 + 3), "tiny_id": np.zeros([2, 0], np.int64)},
        {"item_id": np.zeros([0], np.int64), "hist_items": np.full([2, 2], -1)},
    ]
    for ids in cases:
        ids = {k: v.astype(np.int64) for k, v in ids.items()}
        got = emb.lookup(ids)
        expect = ref.reference_lookup(full, ids)
        assert set(got) == set(ids)
        for f in ids:
            assert got[f].shape == ids[f].shape + (emb.plan.table_of(f).dim,)
            np.testing.assert_array_equal(got[f].numpy(), expect[f])

    lookup = tf.function(emb.lookup, input_signature=[{
        "item_id": tf.TensorSpec([None], tf.int64), "user_id": tf.TensorSpec([None, None], tf.int64)}])
    for b in (7, 0, 3):
        ids = {"item_id": np.arange(b, dtype=np.int64) * 7 % 50,
               "user_id": np.arange(2 * b, dtype=np.int64).reshape(b, 2) * 10 ** 9 - 1}
        got = lookup(ids)
        expect = ref.reference_lookup(full, ids)
        for f in ids:
            np.testing.assert_array_equal(got[f].numpy(), expect[f])
    assert lookup.experimental_get_tracing_count() == 1  # dynamic sizes, one trace


def test_hybrid_moves_whole_units_when_dims_share_a_divisor():
    """Tables of dims 8 and 4 travel in units of 4 floats (a vector of 8 is two units): the
    lookup and its gradient still equal the replicated tables'."""
    plan = ShardingPlan.build([TableConfig("wide", 20, 8), TableConfig("narrow", 9, 4)],
                              {"a": "wide", "b": "narrow", "c": "wide"}, 1)
    ids = {"a": tf.constant([[3, 3, 19], [0, -1, 7]], tf.int64), "b": tf.constant([8, 0, 8, 2], tf.int64),
           "c": tf.constant([7, 5], tf.int64)}
    out = {}
    for mode in ("hybrid", "naive"):
        emb = make_embedding(mode, plan=plan, comm=LocalCommunicator(), optimizer=OPT, seed=0, init_stddev=0.05)
        assert mode != "hybrid" or emb._unit == 4
        with tf.GradientTape() as tape:
            vecs = emb.lookup(ids)
            loss = sum(tf.reduce_sum(v * tf.range(1.0, v.shape[-1] + 1.0)) ** 2 for v in vecs.values())
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, emb.trainable_variables)]
        out[mode] = ({f: v.numpy() for f, v in vecs.items()}, [g.numpy() for g in grads])
    for f in ids:
        np.testing.assert_array_equal(out["hybrid"][0][f], out["naive"][0][f])
    for got, want in zip(out["hybrid"][1], out["naive"][1]):
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert np.abs(want).sum() > 0


def test_negative_ids_give_zeros_and_hashed_ids_wrap(backend):
    """ids < 0 are zero vectors; a hashed table reduces ids modulo its rows (huge ids fine)."""
    emb = _emb(backend)
    user = _full(emb)["user"]
    got = emb.lookup({"user_id": np.array([-1, 7, 14 + 3, 2 ** 62 + 5, -(2 ** 40)], np.int64)})
    v = got["user_id"].numpy()
    np.testing.assert_array_equal(v[0], 0.0)
    np.testing.assert_array_equal(v[4], 0.0)
    np.testing.assert_array_equal(v[1], user[0])
    np.testing.assert_array_equal(v[2], user[3])
    np.testing.assert_array_equal(v[3], user[(2 ** 62 + 5) % 7])


def test_padding_ids_touch_no_row(backend):
    """An id < 0 moves no row, even where its table is held whole and gathered at every position
    (row 0 stands in for it there): after a step that touches row 0, a step with only padding
    beside row 3 leaves row 0 where lazy Adam left it."""
    emb = _emb(backend, kind="adam", lr=0.05)
    step = tf.function(lambda ids: emb.apply_gradients(_grads(emb, ids)))
    step(tf.constant([0, 3], tf.int64))
    before = _full(emb)["item"]
    step(tf.constant([-1, 3, -1], tf.int64))
    after = _full(emb)["item"]
    np.testing.assert_array_equal(after[0], before[0])
    assert np.abs(after[3] - before[3]).max() > 0


def _grads(emb, ids):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(emb.lookup({"item_id": ids})["item_id"])
    return tape.gradient(loss, emb.trainable_variables)


def test_out_of_range_id_raises_naming_the_table(backend):
    """An id >= num_rows of an unhashed table fails with the table and its features named."""
    emb = _emb(backend)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="embedding table item: .*num_rows=50 \\(features: hist_items, item_id"):
        emb.lookup({"hist_items": np.array([[1, 50]], np.int64)})
    traced = tf.function(emb.lookup)
    with pytest.raises(tf.errors.InvalidArgumentError, match="embedding table tiny: id out of range"):
        traced({"tiny_id": tf.constant([0, 1, 2], tf.int64)})


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_steps_match_single_process_reference(backend, kind):
    """Three traced steps (incl. an empty batch) equal plain TF + numpy on the full table."""
    comm = _comm_for(backend)
    initial = {t.name: initial_rows(0, t.name, np.arange(t.num_rows), t.dim, 0.05)
               for t in ref.TABLES}
    result, _ = emb_conformance.run_mode(backend, comm, ref.plan_for(comm.size), initial,
                                         {kind: emb_conformance.OPTIMIZERS[kind]})
    ref.assert_conformance(result, backend)
    res = result[kind]
    if backend.startswith("tiered-"):
        assert res["reload_err"] <= 1e-6 and res["reload_fwd_err"] == 0.0, res
    if backend in ("hybrid", "sok"):
        got = {k: res["counters"][k]["bytes"] for k in res["analytic"]}
        assert got == res["analytic"]


def test_row_optimizer_formulas_by_hand():
    """One step on two rows of a 3-row table, expected values worked out by hand."""
    rows = tf.constant([2, 0], tf.int64)
    g = tf.constant([[0.5, -1.0], [2.0, 0.0]])
    w0 = np.array([[1.0, 1.0], [5.0, 5.0], [0.0, 0.0]], np.float32)

    def one_step(cfg, steps=1):
        opt = RowOptimizer(cfg)
        var = tf.Variable(w0)
        slots = opt.create_slots(var, "t")
        for _ in range(steps):
            opt.apply_rows(var, slots, rows, g, opt.next_step())
        return var.numpy(), slots

    w, _ = one_step(RowOptimizerConfig("sgd", 0.1))
    np.testing.assert_allclose(w, [[0.8, 1.0], [5.0, 5.0], [-0.05, 0.1]], rtol=1e-6)
    # adagrad: a = 0.1 + g^2; w -= 0.1 g / (sqrt(a) + 1e-7)
    w, slots = one_step(RowOptimizerConfig("adagrad", 0.1, initial_accumulator=0.1))
    np.testing.assert_allclose(slots["accumulator"].numpy(), [[4.1, 0.1], [0.1, 0.1], [0.35, 1.1]],
                               rtol=1e-6)
    np.testing.assert_allclose(w[2], [-0.05 / np.sqrt(0.35), 0.1 / np.sqrt(1.1)], rtol=1e-5)
    np.testing.assert_allclose(w[1], [5.0, 5.0])
    # adam, first step: m = 0.1 g, v = 0.001 g^2, lr_t = lr sqrt(0.001)/0.1 -> w -= lr * sign(g)
    w, slots = one_step(RowOptimizerConfig("adam", 0.01, epsilon=1e-12))
    np.testing.assert_allclose(w[0], [0.99, 1.0], atol=1e-6)  # g = 0 leaves the element alone
    np.testing.assert_allclose(w[2], [-0.01, 0.01], atol=1e-6)
    np.testing.assert_allclose(slots["v"].numpy()[1], [0.0, 0.0])
    # adam, two identical steps: m/sqrt(v) stays sign(g) after bias correction with t = 2
    w, _ = one_step(RowOptimizerConfig("adam", 0.01, epsilon=1e-12), steps=2)
    np.testing.assert_allclose(w[2], [-0.02, 0.02], atol=1e-6)
    assert [slots_per_row(k) for k in ("sgd", "adagrad", "adam")] == [0, 1, 2]


def test_dense_and_missing_gradients(backend):
    """A dense gradient updates every row; a None gradient leaves its table alone."""
    emb = _emb(backend)
    before = _full(emb)
    grads = [None] * len(emb.trainable_variables)
    i = emb.table_index("tiny")
    if backend == "naive":
        grads[i] = tf.ones([2, 2])
    else:  # this rank's shard rows
        grads[i] = tf.ones_like(emb.trainable_variables[i])
    if backend.startswith("tiered-"):  # hot rows step through their replica, not the shard
        grads[len(emb.params) + i] = tf.ones_like(emb.hot_params[i])
    emb.apply_gradients(grads)
    after = _full(emb)
    # one process: hybrid scales the sum by 1/1, naive averages over 1 rank
    np.testing.assert_allclose(after["tiny"], before["tiny"] - 0.1, rtol=1e-6)
    np.testing.assert_array_equal(after["item"], before["item"])
    with pytest.raises(ValueError, match="apply_gradients got 1 gradients for [36]"):
        emb.apply_gradients([None])


def test_memory_counts_match_plan(backend):
    """Hybrid holds plan.bytes_on_rank (params + slots); naive holds the replicated tables."""
    for kind in ("sgd", "adam"):
        emb = _emb(backend, kind)
        plan = emb.plan
        if backend == "naive":
            assert emb.memory_bytes() == plan.replicated_bytes(slots_per_row(kind))
        else:  # tiered: the shards plus every hot row (value and slots) on every rank
            hot = sum(len(emb_conformance.HOT_ROWS[t.name]) * t.dim * 4 * (1 + slots_per_row(kind))
                      for t in plan.tables) if backend.startswith("tiered-") else 0
            assert emb.memory_bytes() == plan.bytes_on_rank(emb.comm.rank, slots_per_row(kind)) + hot


def test_set_full_table_round_trip_and_errors(backend):
    """set_full_table then gather_full_table returns the same array; bad shapes are rejected."""
    emb = _emb(backend)
    values = np.arange(200, dtype=np.float32).reshape(50, 4)
    emb.set_full_table("item", values)
    np.testing.assert_array_equal(emb.gather_full_table("item"), values)
    np.testing.assert_array_equal(emb.lookup({"item_id": np.array([7], np.int64)})["item_id"][0],
                                  values[7])
    with pytest.raises(ValueError, match=r"table 'item' is \[50, 4\]"):
        emb.set_full_table("item", values[:3])
    with pytest.raises(KeyError, match="no table 'nope'"):
        emb.gather_full_table("nope")


def test_bad_inputs_have_clear_errors():
    """Unknown features, float ids, wrong plan size and unknown modes fail with named errors."""
    comm = LocalCommunicator()
    emb = make_embedding("hybrid", plan=ref.plan_for(1), comm=comm, optimizer=OPT)
    with pytest.raises(KeyError, match="features \\['price'\\] have no embedding table"):
        emb.lookup({"price": np.array([1])})
    with pytest.raises(TypeError, match="feature 'item_id': ids must be integers"):
        emb.lookup({"item_id": np.array([1.0])})
    with pytest.raises(ValueError, match="world_size=2 but the communicator has size 1"):
        make_embedding("hybrid", plan=ref.plan_for(2), comm=comm, optimizer=OPT)
    with pytest.raises(ValueError, match="embedding mode must be one of"):
        make_embedding("sharded", plan=ref.plan_for(1), comm=comm, optimizer=OPT)
    with pytest.raises(ValueError, match="row optimizer kind"):
        RowOptimizerConfig("rmsprop", 0.1)


def test_auto_mode_and_sok_availability():
    """auto picks sok only where it imports with a GPU; otherwise hybrid, and sok says why."""
    ok, reason = sok_available()
    assert resolve_mode("auto") == ("sok" if ok else "hybrid")
    if not ok:
        assert reason in (UNAVAILABLE_REASON, "merlin-sok imports but no GPU is visible")
        with pytest.raises(RuntimeError, match="embedding mode 'sok' is unavailable"):
            make_embedding("sok", plan=ref.plan_for(1), comm=LocalCommunicator(), optimizer=OPT)
    emb = make_embedding("auto", plan=ref.plan_for(1),
                         comm=LocalCommunicator() if not ok else init_communicator("horovod"), optimizer=OPT)
    assert emb.mode == resolve_mode("auto")


def test_counter_delta_helper():
    """CommCounters.delta reports only what happened since a snapshot."""
    comm = LocalCommunicator()
    emb = make_embedding("naive", plan=ShardingPlan.build([TableConfig("t", 10, 3)], {"f": "t"}, 1),
                         comm=comm, optimizer=OPT)
    comm.allreduce_mean([tf.zeros([5])])
    before = comm.counters.snapshot()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(emb.lookup({"f": np.array([1, 2])})["f"])
    emb.apply_gradients(tape.gradient(loss, emb.trainable_variables))
    delta = comm.counters.delta(before)
    assert delta["allreduce"] == {"bytes": 10 * 3 * 4 + 10 * 4, "calls": 1}
    assert delta["alltoall_ids"] == {"bytes": 0, "calls": 0}
    assert comm.counters.snapshot()["allreduce"]["calls"] == 2


def test_checkpoint_round_trip_includes_optimizer_state(backend, tmp_path):
    """tf.train.Checkpoint saves this rank's shards, slots and step counter, and restores them."""
    emb = _emb(backend, "adam")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(emb.lookup({"item_id": np.array([1, 2, 2], np.int64)})["item_id"])
    emb.apply_gradients(tape.gradient(loss, emb.trainable_variables))
    saved = [v.numpy() for v in emb.variables]
    path = tf.train.Checkpoint(emb=emb).save(str(tmp_path / "ckpt"))
    for v in emb.variables:
        v.assign(tf.zeros_like(v))
    tf.train.Checkpoint(emb=emb).restore(path).assert_consumed()
    assert int(emb.optimizer.iterations.numpy()) == 1
    # 3 tables x (param, m, v) (and as much again for tiered's hot replicas) + the step counter
    assert len(saved) == 3 * 3 * (2 if backend.startswith("tiered-") else 1) + 1
    for before, v in zip(saved, emb.variables):
        np.testing.assert_array_equal(before, v.numpy())
