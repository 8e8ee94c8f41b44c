"""The run's state by name (gmeta.trainer.meta.state), the export built on it, and the scaling rule's
count: every variable that defines a run is listed once, export and load go through that list
only, and tasks without query rows do not count."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import last_json, run_gmeta, train_report
from test_meta_learner import make_batch, make_learner

from gmeta.trainer.meta.state import run_state
from gmeta.trainer.serving.export import export_model, load_model

MODELS = ["melu", "maml_dnn", "maml_esmm", "metaemb"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_run_state_lists_every_variable_once(model, meta_sgd):
    """Every tf.Variable reachable from the learner is in the run state, under one name, except
    the communication counters and the stop request (signals, not state)."""
    learner = make_learner(model, meta_sgd=meta_sgd)
    state = run_state(learner)
    listed = list(state.replicated.values()) + list(state.sharded.values())
    assert len({id(v) for v in listed}) == len(listed), "a variable is listed twice"
    counters = {id(v) for v in learner.comm.counters.variables + learner.comm.stop.variables}
    reachable = {id(v) for v in learner.variables} - counters
    assert {id(v) for v in listed} == reachable
    names = set(state.replicated)
    assert {f"params/{n}" for n in learner.model.params} <= names
    assert ("outer_optimizer/step" in names) and all(
        f"outer_optimizer/m/params/{n}" in names for n in learner.model.params)
    assert any(n.startswith("inner_lr/") for n in names) == meta_sgd
    assert set(state.sharded) >= {f"table/{t.name}" for t in learner.embedding.plan.tables}
    if model == "metaemb":
        assert "seen" in names and any(n.startswith("gen/") for n in names)
        assert state.plain == {"generate_for": "none"}
    else:
        assert state.plain == {}
    # what a predicting model needs excludes optimizer state
    assert not any(n.startswith("outer_optimizer/") for n in state.model_variables())


@pytest.mark.parametrize("model", MODELS)
def test_export_and_load_round_trip_every_model_variable(model, tmp_path):
    """After a training step, export then load reproduces every model variable and the
    adapted and unadapted scores, whatever the model."""
    learner = make_learner(model, meta_sgd=True, inner_lr=0.1)
    batch = make_batch(seed=3)
    learner.train_step(batch)
    if model == "metaemb":
        learner.model.generate_for = "cold"
        learner.model.set_seen_items(np.array([1, 2, 3]))
    export_model(learner, {"emb_optimizer": "sgd", "emb_lr": 0.1}, str(tmp_path / "m"), True)
    loaded, meta = load_model(str(tmp_path / "m"))
    want = run_state(learner).model_variables()
    got = run_state(loaded).model_variables()
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)
    assert loaded.model.plain_state() == learner.model.plain_state()
    a, b = learner.eval_step(batch, 1), loaded.eval_step(batch, 1)
    for key in a:
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), rtol=1e-6, atol=1e-7)


def test_load_rejects_state_of_another_model(tmp_path):
    """A dense.npz that does not match the model names what is missing and what is extra."""
    learner = make_learner("maml_dnn")
    export_model(learner, {}, str(tmp_path / "m"), True)
    with np.load(tmp_path / "m" / "dense.npz") as f:
        values = {k: f[k] for k in f.files}
    values["params/bogus"] = np.zeros(3, np.float32)
    del values["params/mlp/w0"]
    np.savez(tmp_path / "m" / "dense.npz", **values)
    with pytest.raises(ValueError, match=r"missing \['params/mlp/w0'\], unexpected \['params/bogus'\]"):
        load_model(str(tmp_path / "m"))


def test_tasks_without_query_rows_do_not_count():
    """A real task whose query set is empty adds nothing to the loss sum and nothing to the
    count, so the step's mean is the mean over tasks that have a query loss."""
    learner = make_learner("maml_dnn", inner_lr=0.1)
    batch = make_batch(seed=4)
    loss_sum, count = learner.meta_loss_sum(batch)
    assert float(count) == 3.0  # 4 tasks, the last one padding
    query_mask = batch["query"]["mask"].numpy().copy()
    query_mask[1] = 0.0
    emptied = dict(batch, query=dict(batch["query"], mask=tf.constant(query_mask)))
    loss_sum2, count2 = learner.meta_loss_sum(emptied)
    assert float(count2) == 2.0
    per_task = learner.model.task_loss(learner.model.forward(
        learner.adapt(learner.params(), learner.embed(batch)[0], batch["support"], 1, False),
        learner.embed(batch)[1]), batch["query"]).numpy()
    assert float(loss_sum) - float(loss_sum2) == pytest.approx(per_task[1], rel=1e-5)


@pytest.mark.slow  # fast tier: every model's export round trip (test_export_and_load_round_trip_every_model_variable)
def test_metaemb_without_generator_evaluates_the_same_after_export(tiny_synth, tmp_path):
    """`--generator-epochs 0` trains no generator: the export must not switch generated
    embeddings on, so `gmeta evaluate --export` reproduces the run's own evaluation."""
    trained = run_gmeta("train", "--model", "metaemb", "--data", tiny_synth, "--epochs", "1",
                        "--generator-epochs", "0", "--tracking-uri", "none", "--log-every", "0",
                        "--plain-baseline", "off", "--no-saved-model", "--checkpoint-dir", "none",
                        "--support-curve", "none",
                        "--output-dir", tmp_path / "runs", cwd=tmp_path)
    export = trained.stderr.split("export: ")[-1].split()[0]
    evaluated = last_json(run_gmeta("evaluate", "--export", tmp_path / export, "--data", tiny_synth,
                                    cwd=tmp_path))
    result = train_report(trained)
    for split, res in result.items():
        for key in ("auc_adapted", "auc_unadapted"):
            assert evaluated[split][key] == pytest.approx(res[key], abs=1e-5), (split, key)
    assert '"generate_for": "none"' in (tmp_path / export / "gmeta_model.json").read_text()


def test_eval_trace_follows_the_model_switch():
    """An eval function traced before MetaEmb's generator is switched on (the per-epoch
    validation) must not serve the evaluation after it."""
    learner = make_learner("metaemb", inner_lr=0.1)
    batch = make_batch(seed=8)
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), batch)
    before = learner.compiled_eval_step(spec, 1)(batch)["auc/unadapted"].numpy()
    learner.model.generate_for = "all"
    after = learner.compiled_eval_step(spec, 1)(batch)["auc/unadapted"].numpy()
    assert not np.allclose(before, after)
