"""Properties of the MAML loops (single process, the same code the workers run)."""

import numpy as np
import pytest
import tensorflow as tf

from gmeta.io.schema import DenseFeature, Schema, SparseFeature, TableSpec
from gmeta.models.base import ModelConfig
from gmeta.models.registry import build_model
from gmeta.trainer.comm import LocalCommunicator
from gmeta.trainer.meta_learner import MetaConfig, MetaLearner
from gmeta.trainer.setup import build_embedding

SCHEMA = Schema(
    labels=("click", "conversion"),
    sparse=(SparseFeature("user_id", "user_id", group="user"),
            SparseFeature("item_id", "item_id", group="item"),
            SparseFeature("item_tags", "tag", max_len=3, group="item")),
    dense=(DenseFeature("item_price", group="item"),),
    tables=(TableSpec("user_id", 50), TableSpec("item_id", 40), TableSpec("tag", 10)),
    item_id_feature="item_id",
).validate()


def make_batch(T=4, S=6, Q=5, seed=0, schema=SCHEMA):
    """A batch in the reader's layout (docs/INTERFACES.md), with some padding rows and a padding task."""
    rng = np.random.default_rng(seed)

    def part(n):
        out = {}
        for f in schema.sparse:
            rows = schema.table(f.table).num_rows
            shape = (T, n, f.max_len) if f.is_list else (T, n)
            ids = rng.integers(0, rows, size=shape)
            if f.is_list:
                ids[..., 2] = -1
            out[f.name] = tf.constant(ids, tf.int64)
        for d in schema.dense:
            out[d.name] = tf.constant(rng.normal(size=(T, n)), tf.float32)
        click = rng.integers(0, 2, size=(T, n))
        out["click"] = tf.constant(click, tf.float32)
        out["conversion"] = tf.constant(click * rng.integers(0, 2, size=(T, n)), tf.float32)
        mask = np.ones((T, n), np.float32)
        mask[0, -2:] = 0.0
        out["mask"] = tf.constant(mask)
        return out

    task_mask = np.ones(T, np.float32)
    task_mask[-1] = 0.0
    return {"support": part(S), "query": part(Q), "task_id": tf.range(T, dtype=tf.int64),
            "task_mask": tf.constant(task_mask)}


def make_learner(model="maml_dnn", hidden=(8,), **meta):
    m = build_model(model, SCHEMA, ModelConfig(emb_dim=4, hidden=hidden, seed=1))
    comm = LocalCommunicator()
    emb = build_embedding(m, comm, mode="hybrid", optimizer="sgd", learning_rate=0.1, seed=3)
    return MetaLearner(m, emb, comm, MetaConfig(**meta))


def support_losses(learner, batch, params):
    x_s, _ = learner.embed(batch)
    return learner.model.task_loss(learner.model.forward(params, x_s), batch["support"]).numpy()


@pytest.mark.parametrize("model", ["melu", "maml_dnn", "maml_esmm", "metaemb"])
def test_inner_step_lowers_every_task_support_loss(model):
    learner = make_learner(model, inner_lr=0.05)
    batch = make_batch()
    params = learner.params()
    x_s, _ = learner.embed(batch)
    before = support_losses(learner, batch, params)
    fast = learner.adapt(params, x_s, batch["support"], steps=1, first_order=True)
    after = support_losses(learner, batch, fast)
    assert before.shape == (4,)
    assert np.all(after < before), (before, after)


def test_first_order_gradient_equals_hand_built_reference():
    """FO-MAML meta-gradient = query gradient at the adapted weights, summed over real tasks / n."""
    learner = make_learner(hidden=(), first_order=True, inner_lr=0.3)
    batch = make_batch()
    variables = list(learner.model.params.values())
    with tf.GradientTape() as tape:
        loss = learner.meta_loss(batch)
    got = tape.gradient(loss, variables)

    x_s, x_q = learner.embed(batch)
    names = list(learner.model.params)
    ref = [np.zeros(v.shape, np.float32) for v in variables]
    real = [t for t in range(4) if batch["task_mask"][t] > 0]
    for t in real:  # one task at a time, by hand
        w = {n: tf.constant(learner.model.params[n].numpy()[None]) for n in names}
        sup = {k: v[t:t + 1] for k, v in batch["support"].items()}
        qry = {k: v[t:t + 1] for k, v in batch["query"].items()}
        with tf.GradientTape() as t1:
            t1.watch(list(w.values()))
            ls = tf.reduce_sum(learner.model.task_loss(learner.model.forward(w, x_s[t:t + 1]), sup))
        g = t1.gradient(ls, w)
        fast = {n: w[n] - 0.3 * g[n] for n in names}
        with tf.GradientTape() as t2:
            t2.watch(list(fast.values()))
            lq = tf.reduce_sum(learner.model.task_loss(learner.model.forward(fast, x_q[t:t + 1]), qry))
        gq = t2.gradient(lq, fast)
        for i, n in enumerate(names):
            ref[i] += gq[n].numpy()[0] / len(real)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-6)


def test_second_order_gradient_matches_finite_differences():
    learner = make_learner(hidden=(), inner_lr=0.5, inner_steps=2)
    batch = make_batch(seed=5)
    w = learner.model.params["mlp/w0"]
    with tf.GradientTape() as tape:
        loss = learner.meta_loss(batch)
    analytic = tape.gradient(loss, w).numpy()

    fo = make_learner(hidden=(), inner_lr=0.5, inner_steps=2, first_order=True)
    with tf.GradientTape() as tape:
        loss_fo = fo.meta_loss(batch)
    first_order = tape.gradient(loss_fo, fo.model.params["mlp/w0"]).numpy()

    base = w.numpy()
    eps = 1e-2
    checked = 0
    for idx in [(0, 0), (3, 0), (5, 0), (9, 0)]:
        plus, minus = base.copy(), base.copy()
        plus[idx] += eps
        minus[idx] -= eps
        w.assign(plus)
        lp = float(learner.meta_loss(batch))
        w.assign(minus)
        lm = float(learner.meta_loss(batch))
        w.assign(base)
        numeric = (lp - lm) / (2 * eps)
        assert abs(analytic[idx] - numeric) < 2e-3 + 1e-2 * abs(numeric), (idx, analytic[idx], numeric)
        checked += 1
    assert checked == 4
    # the second-order term is really there: first-order differs from the exact gradient
    assert np.max(np.abs(analytic - first_order)) > 1e-4


def test_shuffling_tasks_permutes_outputs_and_nothing_else():
    """Fast weights never leak between tasks: permuting tasks permutes adapted predictions."""
    learner = make_learner("maml_esmm", inner_lr=0.2, inner_steps=2)
    batch = make_batch(seed=7)
    perm = np.array([2, 0, 3, 1])
    shuffled = tf.nest.map_structure(lambda t: tf.gather(t, perm), batch)
    a = learner.eval_step(batch, steps=2)
    b = learner.eval_step(shuffled, steps=2)
    for key in a:
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy()[perm], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a["auc/adapted"].numpy(), a["auc/unadapted"].numpy())


def test_task_loop_baseline_equals_vectorized_step():
    vec = make_learner(inner_lr=0.2, inner_steps=2)
    loop = make_learner(inner_lr=0.2, inner_steps=2, task_loop=True)
    batch = make_batch(seed=9)
    np.testing.assert_allclose(float(loop.meta_loss(batch)), float(vec.meta_loss(batch)), rtol=1e-5)


def test_meta_sgd_learns_inner_rates_and_train_step_lowers_loss():
    learner = make_learner("melu", meta_sgd=True, inner_lr=0.1, outer_lr=0.01)
    batch = make_batch(seed=11)
    step = tf.function(learner.train_step, autograph=False)
    before = {n: v.numpy().copy() for n, v in learner.inner_lrs.items()}
    losses = [float(step(batch)["loss"]) for _ in range(30)]
    assert losses[-1] < losses[0]
    assert any(not np.allclose(before[n], v.numpy()) for n, v in learner.inner_lrs.items())


def make_adapt_learner(model, adapt, **meta):
    m = build_model(model, SCHEMA, ModelConfig(emb_dim=4, hidden=(8,), seed=1, adapt=adapt))
    comm = LocalCommunicator()
    emb = build_embedding(m, comm, mode="hybrid", optimizer="sgd", learning_rate=0.1, seed=3)
    return MetaLearner(m, emb, comm, MetaConfig(**meta))


@pytest.mark.parametrize("model", ["maml_dnn", "maml_esmm"])
@pytest.mark.parametrize("adapt", [("last",), ("user",), ("pref",), ("bias",), ("head", "user", "pref", "bias")])
def test_every_adapted_part_lowers_every_task_support_loss(model, adapt):
    """Whatever adapts, one inner step lowers each task's support loss, and the per-task terms
    start neutral: at initialisation they change no prediction."""
    learner = make_adapt_learner(model, adapt, inner_lr=0.05)
    plain = make_adapt_learner(model, ("head",), inner_lr=0.05)
    batch = make_batch(seed=21)
    params = learner.params()
    np.testing.assert_allclose(support_losses(learner, batch, params),
                               support_losses(plain, batch, plain.params()), rtol=1e-6)
    x_s, _ = learner.embed(batch)
    fast = learner.adapt(params, x_s, batch["support"], steps=1, first_order=True)
    for name in learner.model.adapted_names():
        assert fast[name].shape[0] == 4 and fast[name].shape[1:] == params[name].shape
    before = support_losses(learner, batch, params)
    after = support_losses(learner, batch, fast)
    assert np.all(after[:3] < before[:3]), (adapt, before, after)  # task 3 is padding


def test_bias_adaptation_never_reorders_a_task():
    """Scale and bias of the logit move a user's level; the order of their items stays."""
    learner = make_adapt_learner("melu", ("bias",), inner_lr=0.5)
    out = learner.eval_step(make_batch(seed=22), steps=3)
    before, after = out["auc/unadapted"].numpy(), out["auc/adapted"].numpy()
    assert not np.allclose(before, after)
    for t in range(4):
        np.testing.assert_array_equal(np.argsort(before[t], kind="stable"), np.argsort(after[t], kind="stable"))


def test_user_adaptation_meta_gradient_reaches_the_embedding_rows():
    """The user shift starts at the looked-up rows, so the query loss after adaptation is
    differentiated through the inner loop back into the user tables (second order)."""
    learner = make_adapt_learner("maml_dnn", ("user",), inner_lr=0.5)
    batch = make_batch(seed=23)
    with tf.GradientTape() as tape:
        loss = learner.meta_loss(batch)
    variables = list(learner.embedding.trainable_variables) + [learner.model.params["task/user_shift"]]
    grads = tape.gradient(loss, variables)
    user_table = learner.embedding.table_index("user_id")
    g = tf.convert_to_tensor(grads[user_table])
    assert float(tf.reduce_max(tf.abs(g))) > 0
    assert float(tf.reduce_max(tf.abs(grads[-1]))) > 0


def test_bad_adapt_choices_are_clear_errors():
    with pytest.raises(ValueError, match="--adapt user: the schema has no user-group feature"):
        make_adapt_learner("melu", ("user",))  # MeLU embeds no user id, and the schema has no other
    with pytest.raises(ValueError, match="choose one or more of head, last, user, pref, bias"):
        ModelConfig(adapt=("everything",))
    with pytest.raises(ValueError, match="head already includes last"):
        ModelConfig(adapt=("head", "last"))
