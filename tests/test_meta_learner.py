"""Properties of the MAML loops (single process, the same code the workers run)."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import LOOP_TEST_SETTINGS, part_configs

from gmeta.io.schema import DenseFeature, Schema, SparseFeature, TableSpec
from gmeta.models.registry import build_model
from gmeta.trainer.embedding.build import build_embedding
from gmeta.trainer.meta.learner import MetaLearner, spd_solve
from gmeta.trainer.parallel.comm import LocalCommunicator

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


def _settings(**meta):
    """The loop tests' settings with ``meta`` (MetaConfig names) changed."""
    settings = dict(LOOP_TEST_SETTINGS, emb_optimizer="sgd", emb_lr=0.1)
    if "plain_weight" in meta:
        meta["plain_loss_weight"] = meta.pop("plain_weight")
    return {**settings, **meta}


def make_learner(model="maml_dnn", hidden=(8,), **meta):
    model_cfg, meta_cfg, row_cfg = part_configs(model, **_settings(hidden=hidden, **meta))
    m = build_model(model, SCHEMA, model_cfg)
    comm = LocalCommunicator()
    emb = build_embedding(m, comm, mode="hybrid", optimizer=row_cfg, seed=3)
    return MetaLearner(m, emb, comm, meta_cfg)


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
    return make_learner(model, adapt=adapt, **meta)


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
        part_configs("melu", adapt=("everything",))
    with pytest.raises(ValueError, match="head already includes last"):
        part_configs("melu", adapt=("head", "last"))


RATING_SCHEMA = Schema(
    labels=("click", "rating"),
    sparse=(SparseFeature("item_id", "item_id", group="item"), SparseFeature("age", "age", group="user")),
    dense=(DenseFeature("item_price", group="item"),),
    tables=(TableSpec("item_id", 40), TableSpec("age", 5)),
    item_id_feature="item_id",
).validate()


def test_spd_solve_and_its_gradient_equal_automatic_differentiation_through_cholesky():
    """The closed-form step's solve: value and gradients (through a matrix built symmetric, as
    the step builds its Hessian) equal TensorFlow's own through cholesky and cholesky_solve."""
    rng = np.random.default_rng(0)
    a, b, w = (tf.constant(rng.standard_normal(shape), tf.float64) for shape in ((4, 6, 6), (4, 6, 1), (4, 6, 1)))

    def loss_and_grads(solve):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            matrix = tf.linalg.matmul(a, a, transpose_a=True) + 0.5 * tf.eye(6, dtype=tf.float64)
            loss = tf.reduce_sum(solve(matrix, 2.0 * b) * w)
        return [loss.numpy()] + [g.numpy() for g in tape.gradient(loss, [a, b])]

    ours = loss_and_grads(spd_solve)
    autodiff = loss_and_grads(lambda m, r: tf.linalg.cholesky_solve(tf.linalg.cholesky(m), r))
    for got, want in zip(ours, autodiff):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert np.abs(ours[1]).sum() > 1.0


def test_item_columns_as_a_split_equal_the_general_gather():
    """Contiguous item columns are cut with a split, not gathered: the linear task terms, their
    design, their update and the design's gradient in the inputs are the same values either way."""
    learner = make_ridge_learner("maml_dnn", adapt=("user", "pref", "bias"))
    model = learner.model
    assert model._item_slice is not None and model._item_slice != (0, model.input_width)
    rng = np.random.default_rng(4)
    x = tf.constant(rng.standard_normal((3, 5, model.input_width)), tf.float32)
    fast = {n: tf.constant(rng.standard_normal((3,) + tuple(v.shape)), tf.float32) for n, v in model.params.items()
            if n.startswith("task/")}
    values = tf.constant(rng.standard_normal((3, model.linear_task_width())), tf.float32)
    weights = tf.constant(rng.standard_normal((3, 5, model.linear_task_width())), tf.float32)

    def terms():
        with tf.GradientTape() as tape:
            tape.watch(x)
            design = model.task_design(fast, x)
            weighted = tf.reduce_sum(design * weights)
        return (model.linear_task_values(fast, 3), design, model.with_linear_task_values(fast, values),
                tape.gradient(weighted, x))

    split = terms()
    model._item_slice = None
    gathered = terms()
    for a, b in zip(tf.nest.flatten(split), tf.nest.flatten(gathered)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.abs(split[-1].numpy()).sum() > 0


@pytest.mark.parametrize("shared_shift,shared_w", [(True, True), (False, True), (True, False), (False, False)])
def test_dense_with_a_shift_equals_dense_of_shifted_inputs(shared_shift, shared_w):
    """``dense(x, w, b, shift)`` (the shift's product taken once per task) equals ``dense`` of the
    shifted rows, in value and in the gradients of x, w and the shift, for shared ([in]) and
    per-task ([T, in]) shifts and weights."""
    from gmeta.models import layers

    rng = np.random.default_rng(7)
    x = tf.constant(rng.standard_normal((3, 5, 6)), tf.float32)
    w = tf.constant(rng.standard_normal((6, 4) if shared_w else (3, 6, 4)), tf.float32)
    b = tf.constant(rng.standard_normal((4,)), tf.float32)
    shift = tf.constant(rng.standard_normal((6,) if shared_shift else (3, 6)), tf.float32)
    weights = tf.constant(rng.standard_normal((3, 5, 4)), tf.float32)

    def both(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, w, shift])
            y = fn()
            total = tf.reduce_sum(y * weights)
        return [y] + tape.gradient(total, [x, w, shift])

    got = both(lambda: layers.dense(x, w, b, shift))
    want = both(lambda: layers.dense(x + (shift if shared_shift else shift[:, None, :]), w, b))
    for a, e in zip(got, want):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)


def make_ridge_learner(model="maml_dnn", adapt=("pref", "bias"), schema=SCHEMA, target="auto", **meta):
    model_cfg, meta_cfg, row_cfg = part_configs(model, **_settings(adapt=adapt, target=target, inner_solver="ridge",
                                                                   **meta))
    m = build_model(model, schema, model_cfg)
    emb = build_embedding(m, LocalCommunicator(), mode="hybrid", optimizer=row_cfg, seed=3)
    return MetaLearner(m, emb, LocalCommunicator(), meta_cfg)


def _rating_batch(seed=31):
    batch = make_batch(seed=seed, schema=RATING_SCHEMA)
    rng = np.random.default_rng(seed)
    for part in ("support", "query"):
        shape = batch[part]["mask"].shape
        batch[part]["rating"] = tf.constant(rng.integers(1, 6, size=shape), tf.float32)
    return batch


def test_ridge_step_on_ratings_is_the_exact_penalised_least_squares_solution():
    """Squared loss: one Newton step lands on the minimiser of each task's summed support loss +
    (lambda / 2) ||delta||^2 in (pref, bias), worked out here with numpy on the same design."""
    learner = make_ridge_learner("melu", schema=RATING_SCHEMA, target="rating", ridge_lambda=0.7)
    learner.model.fit_target(np.array([1.0, 2.0, 5.0, 4.0]))
    batch = _rating_batch()
    params = learner.params()
    x_s, _ = learner.embed(batch)
    fast = learner.adapt(params, x_s, batch["support"], steps=1, first_order=True)
    model = learner.model
    mean, std = model.target_stats.numpy()
    base = model.forward(params, x_s)["out"].numpy()
    design = model.task_design(params, x_s).numpy()
    mask = batch["support"]["mask"].numpy()
    target = (batch["support"]["rating"].numpy() - mean) / std
    width = design.shape[-1]
    for t in range(4):
        m = mask[t] > 0
        d, r = design[t][m], (target[t] - base[t])[m]
        # loss = sum (r - d delta)^2 (d/ddelta: -2 d'(r - d delta)), penalty lambda/2 |delta|^2
        want = np.linalg.solve(2 * d.T @ d + 0.7 * np.eye(width), 2 * d.T @ r)
        got = (model.linear_task_values(fast, 4) - model.linear_task_values(params, 4)).numpy()[t]
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)
    # the preference's columns outside the item group never move (they never reach the output)
    outside = np.flatnonzero(model.column_groups() != "item")
    np.testing.assert_array_equal(fast["task/pref"].numpy()[:, outside], 0.0)
    assert design.shape[-1] == int((model.column_groups() == "item").sum()) + 1
    # a second step from the optimum stays there
    again = learner.adapt(params, x_s, batch["support"], steps=2, first_order=True)
    np.testing.assert_allclose(again["task/pref"].numpy(), fast["task/pref"].numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("model", ["melu", "maml_dnn", "maml_esmm"])
def test_ridge_step_lowers_every_task_penalised_support_loss(model):
    """Logistic losses: the Newton (IRLS) step lowers each real task's support loss; with a huge
    penalty it changes nothing; the closed-form derivatives a model gives equal the nested-tape
    ones the learner takes otherwise (maml_esmm's combined loss uses the tapes)."""
    learner = make_ridge_learner(model, ridge_lambda=0.5)
    batch = make_batch(seed=32)
    params = learner.params()
    x_s, _ = learner.embed(batch)
    fast = learner.adapt(params, x_s, batch["support"], steps=1, first_order=True)
    before, after = support_losses(learner, batch, params), support_losses(learner, batch, fast)
    assert np.all(after[:3] < before[:3]), (before, after)
    p = {**params, **fast}
    out = learner.model.forward(p, x_s)
    given = learner.model.output_derivatives(out, batch["support"])
    taped = learner._output_derivatives(p, x_s, batch["support"])
    if model == "maml_esmm":
        assert given is None
    else:
        for a, b in zip(given, taped):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    stiff = make_ridge_learner(model, ridge_lambda=1e9)
    still = stiff.adapt(stiff.params(), x_s, batch["support"], steps=1, first_order=True)
    np.testing.assert_allclose(support_losses(stiff, batch, still), support_losses(stiff, batch, stiff.params()),
                               rtol=1e-5)


def test_ridge_meta_gradient_reaches_lambda_and_the_tables_and_first_order_stops_it():
    """Second order through the solve: the query loss after adaptation differentiates into the
    learned penalty, the shared preference and the item table; first order leaves the penalty
    without gradient (the solution is a constant)."""
    batch = make_batch(seed=33)
    for first_order in (False, True):
        learner = make_ridge_learner("melu", first_order=first_order, plain_weight=0.0)
        with tf.GradientTape() as tape:
            loss = learner.meta_loss(batch)
        lam = learner.ridge_log_lambda["log_lambda"]
        variables = [lam, learner.model.params["task/pref"], *learner.embedding.trainable_variables]
        g_lam, g_pref, *g_tables = tape.gradient(loss, variables)
        item = tf.convert_to_tensor(g_tables[learner.embedding.table_index("item_id")])
        if first_order:
            assert g_lam is None
        else:
            assert float(tf.reduce_max(tf.abs(g_lam))) > 0
            assert float(tf.reduce_max(tf.abs(item))) > 0
        assert g_pref is not None


def test_ridge_vectorized_equals_task_loop_and_mixes_with_gradient_steps():
    """All tasks solved at once equal one task at a time; stepped parts (the user shift) take
    gradient steps in the same inner loop."""
    vec = make_ridge_learner(adapt=("user", "pref", "bias"), inner_lr=0.3, inner_steps=2)
    loop = make_ridge_learner(adapt=("user", "pref", "bias"), inner_lr=0.3, inner_steps=2, task_loop=True)
    batch = make_batch(seed=34)
    np.testing.assert_allclose(float(loop.meta_loss(batch)), float(vec.meta_loss(batch)), rtol=1e-5)
    assert vec.solved == ("task/pref", "task/bias")
    params = vec.params()
    x_s, _ = vec.embed(batch)
    fast = vec.adapt(params, x_s, batch["support"], steps=1, first_order=True)
    assert not np.allclose(fast["task/user_shift"].numpy(), params["task/user_shift"].numpy())


def test_ridge_penalty_is_learned_and_saved():
    learner = make_ridge_learner("melu", outer_lr=0.05, ridge_lambda=2.0)
    assert "ridge/log_lambda" in learner.state_variables()
    np.testing.assert_allclose(np.exp(learner.ridge_log_lambda["log_lambda"].numpy()), 2.0, rtol=1e-6)
    step = tf.function(learner.train_step, autograph=False)
    for _ in range(5):
        step(make_batch(seed=35))
    assert not np.allclose(np.exp(learner.ridge_log_lambda["log_lambda"].numpy()), 2.0)
    with pytest.raises(ValueError, match="--inner-solver"):
        part_configs("melu", inner_solver="exact")
    with pytest.raises(ValueError, match="--ridge-lambda"):
        part_configs("melu", ridge_lambda=0.0)


def test_item_prior_is_the_smoothed_item_mean_added_to_the_output():
    """--item-prior: per item row (mean label with 10 pseudo-rows of the global mean) as log-odds
    from the global mean's, zero for items never seen; the model's output moves by exactly it."""
    m = build_model("maml_dnn", SCHEMA, part_configs("maml_dnn", **_settings(adapt=("pref", "bias"), item_prior=True))[0])
    plain = build_model("maml_dnn", SCHEMA, part_configs("maml_dnn", **_settings(adapt=("pref", "bias")))[0])
    m.fit_item_prior(np.array([3, 3, 3, 7, -1]), np.array([1.0, 1.0, 0.0, 0.0, 1.0]))
    g = 2 / 4
    logit = lambda p: np.log(p / (1 - p))
    want = np.zeros(40)
    want[3] = logit((2 + 10 * g) / (3 + 10)) - logit(g)
    want[7] = logit((0 + 10 * g) / (1 + 10)) - logit(g)
    np.testing.assert_allclose(m.item_prior.numpy(), want, rtol=1e-5, atol=1e-7)
    assert "item_prior" in m.state_variables() and m.input_width == plain.input_width + 1
    _, meta_cfg, row_cfg = part_configs("maml_dnn", **_settings(adapt=("pref", "bias"), item_prior=True))
    emb = build_embedding(m, LocalCommunicator(), mode="hybrid", optimizer=row_cfg, seed=3)
    learner = MetaLearner(m, emb, LocalCommunicator(), meta_cfg)
    w0 = m.params["mlp/w0"]
    w0.assign(tf.concat([w0[:-1], tf.zeros_like(w0[-1:])], 0))   # the MLP does not read the prior column
    batch = make_batch(seed=41)
    x_s, _ = learner.embed(batch)
    out = m.forward(learner.params(), x_s)["out"].numpy()
    saved = m.item_prior.numpy()
    m.item_prior.assign(np.zeros(40, np.float32))
    x0, _ = learner.embed(batch)
    base = m.forward(learner.params(), x0)["out"].numpy()
    m.item_prior.assign(saved)
    items = batch["support"]["item_id"].numpy()
    np.testing.assert_allclose(out - base, want[items], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="--item-prior needs"):
        build_model("maml_dnn", Schema(labels=("click",), sparse=SCHEMA.sparse, dense=SCHEMA.dense,
                                       tables=SCHEMA.tables).validate(),
                    part_configs("maml_dnn", **_settings(item_prior=True))[0])


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    """The best epoch's weights (dense variables and table shards) come back exactly after later
    epochs changed them; each learner is scored by its own GAUC; training stops once none
    improved for ``patience`` epochs."""
    from gmeta.trainer.run.early_stopping import EarlyStopping

    learner, plain = make_learner("melu", inner_lr=0.1), make_learner("melu", meta="none")
    step = tf.function(learner.train_step, autograph=False)
    logs = []
    stopper = EarlyStopping(learner, plain, patience=2, log=logs.append)

    def report(adapted, plain_unadapted):
        return {"auc": {"adapted": {"gauc": {"value": adapted}}, "plain": {"gauc": {"value": plain_unadapted}}}}

    assert not stopper.offer(0, report(0.60, 0.55))
    best_w = learner.model.params["mlp/w0"].numpy().copy()
    best_table = learner.embedding.params[0].numpy().copy()
    step(make_batch(seed=51))
    assert not stopper.offer(1, report(0.58, 0.57))          # the plain network improved
    plain_w = plain.model.params["mlp/w0"].numpy().copy()
    step(make_batch(seed=52))
    tf.function(plain.train_step, autograph=False)(make_batch(seed=53))
    assert not np.allclose(plain.model.params["mlp/w0"].numpy(), plain_w)
    assert not np.allclose(learner.model.params["mlp/w0"].numpy(), best_w)
    assert not stopper.offer(2, report(0.59, 0.50))
    assert stopper.offer(3, report(0.59, 0.56))              # two epochs without improvement
    assert stopper.restore() == {"model": 0, "plain network": 1}
    np.testing.assert_array_equal(learner.model.params["mlp/w0"].numpy(), best_w)
    np.testing.assert_array_equal(learner.embedding.params[0].numpy(), best_table)
    np.testing.assert_array_equal(plain.model.params["mlp/w0"].numpy(), plain_w)
    assert any("early stopping after epoch 3" in m for m in logs)
