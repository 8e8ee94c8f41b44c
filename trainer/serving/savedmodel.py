"""Serving what was meta-learned: a TensorFlow SavedModel that adapts to a cold user in-graph.

``write_saved_model(export_dir)`` loads a gmeta export in this process (``export.load_model``:
a LocalCommunicator and full tables) and saves ``<export>/saved_model/``, which loads with
TensorFlow alone (no gmeta, no Horovod, no custom Python objects). Signatures (T tasks, S support
rows, Q query rows, N rows, L list length: all ``None``, any size works):

``predict``                  the global (unadapted) model on plain rows
    inputs   ``<sparse feature>`` int64 [N] (list features [N, L], padded with -1),
             ``<dense feature>`` float32 [N]
    outputs  ``score`` float32 [N] (and ``score_<head>`` for extra heads, e.g. ``score_ctcvr``)
``adapt_and_predict``        the trained inner loop on each task's support rows, then its query
    inputs   ``support_<feature>`` [T, S(, L)], ``support_<label>`` float32 [T, S] (the labels
             the inner-loop loss reads: click; click and conversion for MAML-ESMM; or rating),
             ``support_mask`` float32 [T, S] (1 real row, 0 padding),
             ``query_<feature>`` [T, Q(, L)], ``query_mask`` float32 [T, Q]
    outputs  ``score_adapted`` / ``score_unadapted`` float32 [T, Q] (and per extra head)
``adapt_and_predict_steps``  the same with ``steps`` int32 [] in ``[0, max_steps]``

Nothing is re-implemented: inside the traced functions the loaded learner's ``adapt`` (same
steps, learning rate, Meta-SGD rates, inner clipping and adapted parameters as training) and the
model's ``build_inputs`` / ``forward`` / ``scores`` run as in ``MetaLearner.eval_step``. Only the
embedding lookup differs: ``ServingTables`` gathers from the full tables (the learner's own
variables, which hold the whole table with one process) by the schema's id rule, zero vectors for
ids < 0, so no collective (and no Horovod op) is ever traced; ``write_saved_model`` checks the
saved graph for Horovod ops anyway. MetaEmb's generated embeddings for unseen items are part of
``build_inputs`` and so part of the graph.

``gmeta_serving.json`` next to the SavedModel describes it for the runtime (``gmeta.trainer.
serving``, which imports no gmeta) and for the MLflow model (``pyfunc_log_kwargs``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import tensorflow as tf

from gmeta.io.schema import id_rows
from gmeta.trainer.serving.export import EXPORT_FILE, load_model

SAVED_MODEL_DIR = "saved_model"
SERVING_META = "gmeta_serving.json"  # the name gmeta.trainer.serving.runtime reads
DEFAULT_MAX_TABLE_BYTES = 2 * 1024 ** 3
MAX_TABLE_BYTES_ENV = "GMETA_MAX_SERVING_TABLE_BYTES"
FORMAT = 1


class ServingTooLargeError(ValueError):
    """The embedding tables do not fit the serving limit (the message says what to do)."""


def trained_steps(meta: dict) -> int:
    """Inner steps the model was evaluated with (``gmeta evaluate``'s default)."""
    run = meta.get("run_config", {})
    steps = run.get("eval_inner_steps", -1)
    return int(run.get("inner_steps", meta["meta_config"].get("inner_steps", 1)) if steps < 0 else steps)


def output_name(head: str, first: bool) -> str:
    """Score output of a head of ``model.scores``: ``score`` for the headline, ``score_<h>``
    for the others (``auc_ctcvr`` -> ``score_ctcvr``)."""
    return "score" if first else "score_" + head.removeprefix("auc_")


def table_bytes(meta: dict) -> dict:
    return {name: int(np.prod(shape)) * 4 for name, shape in meta["tables"].items()}


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def check_table_bytes(meta: dict, limit: int) -> int:
    """The tables' total bytes; ``ServingTooLargeError`` (saying what to do) when over ``limit``."""
    sizes = table_bytes(meta)
    total = sum(sizes.values())
    if total > limit:
        biggest = ", ".join(f"{n} {_size(b)}" for n, b in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
        raise ServingTooLargeError(
            f"the embedding tables total {_size(total)} ({biggest}), over the serving limit of "
            f"{_size(limit)}: the SavedModel holds every table whole in one process. Serve it from a "
            f"machine with that memory and raise the limit (gmeta predict --max-serving-table-bytes "
            f"{total}, or {MAX_TABLE_BYTES_ENV}={total} for the export at the end of gmeta train), or "
            f"shrink the tables (fewer hash buckets, a smaller --emb-dim)")
    return total


# ----------------------------------------------------------------------------- the graph
def build_module(learner, steps: int, max_steps: int):
    """``(module, signatures, labels)``: the ``tf.Module`` to save (variables only), its three
    traced signatures (module docstring) and the labels the inner loop reads from support rows."""
    model = learner.model
    schema = model.schema
    plan = learner.embedding.plan
    if learner.comm.size != 1:
        raise ValueError("write the SavedModel from a loaded export (one process, full tables)")

    class _KeyRecorder(dict):
        def __init__(self, *args):
            super().__init__(*args)
            self.used = set()

        def __getitem__(self, key):
            self.used.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            self.used.add(key)
            return super().get(key, default)

    def needed_labels() -> list:
        """The labels the inner-loop loss reads (probed once, eagerly, on one dummy row)."""
        x = tf.zeros([1, 1, model.input_width])
        part = _KeyRecorder({lab: tf.zeros([1, 1]) for lab in schema.labels})
        part["mask"] = tf.ones([1, 1])
        model.task_loss(model.forward(learner.params(), x), part)
        return [lab for lab in schema.labels if lab in part.used]

    class ServingTables(tf.Module):
        """Full tables as plain variables: ids -> rows by the schema's rule, zeros for ids < 0."""

        def __init__(self):
            super().__init__(name="serving_tables")
            self.tables = []
            for table in plan.tables:
                var = learner.embedding.trainable_variables[plan.table_index(table.name)]
                if tuple(var.shape) != (table.num_rows, table.dim):
                    raise ValueError(f"table {table.name}: expected the full table "
                                     f"[{table.num_rows}, {table.dim}], got {var.shape}")
                self.tables.append(var)

        def lookup(self, part: dict) -> dict:
            out = {}
            for f in model.sparse_features:
                table = plan.table_of(f)
                ids = part[f]
                rows = id_rows(tf.maximum(ids, 0), table.num_rows, table.hashed)
                if not table.hashed:
                    check = tf.debugging.assert_less(
                        rows, tf.constant(table.num_rows, tf.int64),
                        message=f"feature {f}: id out of range of table {table.name} "
                                f"(num_rows={table.num_rows})")
                    with tf.control_dependencies([check]):
                        rows = tf.identity(rows)
                vectors = tf.gather(self.tables[plan.table_index(table.name)], rows)
                out[f] = tf.where((ids >= 0)[..., None], vectors, tf.zeros_like(vectors))
            return out

    labels = needed_labels()

    def part_of(inputs: dict, prefix: str, with_labels: bool) -> dict:
        part = {}
        for f in model.sparse_features:
            ids = inputs[prefix + f]
            if schema.feature(f).is_list:  # the reader keeps the first max_len ids
                ids = ids[..., :schema.feature(f).max_len]
            part[f] = ids
        for d in model.dense_features:
            part[d] = inputs[prefix + d]
        part["mask"] = inputs[prefix + "mask"]
        zeros = tf.zeros_like(part["mask"])
        for lab in schema.labels:
            part[lab] = inputs[prefix + lab] if with_labels and lab in labels else zeros
        return part

    def feature_specs(prefix: str, lead: list) -> dict:
        specs = {}
        for f in model.sparse_features:
            shape = lead + ([None] if schema.feature(f).is_list else [])
            specs[prefix + f] = tf.TensorSpec(shape, tf.int64, name=prefix + f)
        for d in model.dense_features:
            specs[prefix + d] = tf.TensorSpec(lead, tf.float32, name=prefix + d)
        return specs

    task_spec = {**feature_specs("support_", [None, None]),
                 **{f"support_{lab}": tf.TensorSpec([None, None], tf.float32, name=f"support_{lab}")
                    for lab in labels},
                 "support_mask": tf.TensorSpec([None, None], tf.float32, name="support_mask"),
                 **feature_specs("query_", [None, None]),
                 "query_mask": tf.TensorSpec([None, None], tf.float32, name="query_mask")}
    steps_spec = {**task_spec, "steps": tf.TensorSpec([], tf.int32, name="steps")}
    row_spec = feature_specs("", [None])

    class ServingModule(tf.Module):
        """What the SavedModel holds: variables only (the traced signatures capture them)."""

        def __init__(self):
            super().__init__(name="gmeta_serving")
            self.lookup = ServingTables()
            self.dense = list(model.state_variables().values()) + learner.adaptation_variables()

    module = ServingModule()

    def scores(params, x, part) -> dict:
        return {output_name(h, i == 0): s for i, (h, (s, _)) in
                enumerate(model.scores(model.forward(params, x), part).items())}

    def prepare(inputs):
        support = part_of(inputs, "support_", with_labels=True)
        query = part_of(inputs, "query_", with_labels=False)
        x_support = model.build_inputs(module.lookup.lookup(support), support)
        x_query = model.build_inputs(module.lookup.lookup(query), query)
        params = learner.params()
        return support, query, x_support, x_query, params, scores(params, x_query, query)

    def adapted(params, x_support, x_query, support, query, k: int) -> dict:
        # eval_step's inner loop: the trained learner's adapt (first order: no outer gradient)
        fast = learner.adapt(params, x_support, support, k, first_order=True)
        return scores(fast, x_query, query)

    def outputs(before: dict, after: dict) -> dict:
        out = {}
        for name in before:
            out[f"{name}_adapted"] = after[name]
            out[f"{name}_unadapted"] = before[name]
        return out

    def predict(inputs):
        part = {k: v[None] for k, v in inputs.items()}
        for f in model.sparse_features:
            if schema.feature(f).is_list:
                part[f] = part[f][..., :schema.feature(f).max_len]
        part["mask"] = tf.ones([1, tf.shape(next(iter(inputs.values())))[0]])
        for lab in schema.labels:
            part[lab] = tf.zeros_like(part["mask"])
        x = model.build_inputs(module.lookup.lookup(part), part)
        return {k: v[0] for k, v in scores(learner.params(), x, part).items()}

    def adapt_and_predict(inputs):
        support, query, x_s, x_q, params, before = prepare(inputs)
        return outputs(before, adapted(params, x_s, x_q, support, query, steps))

    def adapt_and_predict_steps(inputs):
        inputs = dict(inputs)
        n_steps = inputs.pop("steps")
        checks = [tf.debugging.assert_less_equal(n_steps, max_steps,
                                                 message=f"steps must be <= max_steps={max_steps}"),
                  tf.debugging.assert_non_negative(n_steps, message="steps must be >= 0")]
        support, query, x_s, x_q, params, before = prepare(inputs)
        names = list(before)

        def branch(k):
            return lambda: [adapted(params, x_s, x_q, support, query, k)[n] for n in names]

        with tf.control_dependencies(checks):
            after = tf.switch_case(n_steps, [branch(k) for k in range(max_steps + 1)])
        return outputs(before, dict(zip(names, after)))

    signatures = {
        name: tf.function(fn, input_signature=[spec], autograph=False).get_concrete_function()
        for name, fn, spec in (("predict", predict, row_spec),
                               ("adapt_and_predict", adapt_and_predict, task_spec),
                               ("adapt_and_predict_steps", adapt_and_predict_steps, steps_spec))}
    return module, signatures, labels


def horovod_ops(saved_model_dir: str) -> list:
    """Op types of the saved graph (and its functions) that come from Horovod (should be none)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for graph in proto.meta_graphs:
        ops.update(n.op for n in graph.graph_def.node)
        for fn in graph.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return sorted(op for op in ops if "horovod" in op.lower())


def write_saved_model(export_dir: str, out_dir: str | None = None,
                      max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES, max_steps: int | None = None) -> str:
    """Build the SavedModel of an export (default ``<export>/saved_model``); see the module
    docstring. ``max_steps``: the largest ``steps`` of ``adapt_and_predict_steps`` (default
    ``max(4, trained + 3)``; each count is one more unrolled branch in the graph). Raises
    ``ServingTooLargeError`` before loading anything when the tables exceed ``max_table_bytes``."""
    with open(os.path.join(export_dir, EXPORT_FILE)) as f:
        meta = json.load(f)
    total = check_table_bytes(meta, max_table_bytes)
    learner, meta = load_model(export_dir)
    model, schema = learner.model, learner.model.schema
    steps = trained_steps(meta)
    max_steps = max(4, steps + 3) if max_steps is None else int(max_steps)
    if max_steps < steps:
        raise ValueError(f"max_steps={max_steps} is below the trained {steps} inner steps")
    module, signatures, labels = build_module(learner, steps, max_steps)
    out_dir = out_dir or os.path.join(export_dir, SAVED_MODEL_DIR)
    if os.path.exists(os.path.join(out_dir, "saved_model.pb")):
        shutil.rmtree(out_dir)  # an older SavedModel of this export
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: not empty and not a SavedModel; give an empty or new directory")
    tf.saved_model.save(module, out_dir, signatures=signatures)
    bad = horovod_ops(out_dir)
    if bad:
        raise RuntimeError(f"{out_dir}: the serving graph holds Horovod ops {bad}")
    heads = {output_name(h, i == 0): h for i, h in enumerate(_head_names(learner))}
    run = meta.get("run_config", {})
    serving = {
        "format": FORMAT,
        "model": meta["model"],
        "target": model.target,
        "task_column": schema.task_column,
        "query_column": schema.query_column,
        "sparse": [{"name": f, "max_len": schema.feature(f).max_len} for f in model.sparse_features],
        "dense": list(model.dense_features),
        "labels": labels,
        "item_feature": schema.item_id_feature,
        "outputs": list(heads),   # score (the headline head), score_<head> for the others
        "heads": heads,           # output -> the head's name in model.scores / the evaluation report
        "steps": steps,
        "max_steps": max_steps,
        "support_size": int(run["support_size"]) if str(run.get("support_size", "")).isdigit() else 0,
        "query_size": int(run["query_size"]) if str(run.get("query_size", "")).isdigit() else 0,
        "table_bytes": total,
        "signatures": {name: {"inputs": sorted(fn.structured_input_signature[0][0]),
                              "outputs": sorted(fn.structured_outputs)} for name, fn in signatures.items()},
    }
    with open(os.path.join(out_dir, SERVING_META), "w") as f:
        json.dump(serving, f, indent=2, sort_keys=True)
    return out_dir


def _head_names(learner) -> list:
    model = learner.model
    x = tf.zeros([1, 1, model.input_width])
    part = {lab: tf.zeros([1, 1]) for lab in model.schema.labels}
    part["mask"] = tf.ones([1, 1])
    return list(model.scores(model.forward(learner.params(), x), part))


def export_serving(export_dir: str, log=None) -> str | None:
    """The end of ``export_model``: write the SavedModel, or say why not without failing the run
    whose export is already complete (tables over ``$GMETA_MAX_SERVING_TABLE_BYTES``, default
    2 GiB; any other error is reported the same way, and raised with ``GMETA_DEBUG=1``)."""
    log = log or (lambda m: print(f"[gmeta] {m}", file=sys.stderr, flush=True))
    limit = int(os.environ.get(MAX_TABLE_BYTES_ENV, DEFAULT_MAX_TABLE_BYTES))
    try:
        return write_saved_model(export_dir, max_table_bytes=limit)
    except ServingTooLargeError as exc:
        log(f"WARNING no SavedModel written: {exc}")
    except Exception as exc:  # noqa: BLE001 - the trained model is exported; serving can be built later
        if os.environ.get("GMETA_DEBUG") == "1":
            raise
        log(f"WARNING no SavedModel written ({type(exc).__name__}: {exc}); the export is complete, "
            f"and gmeta predict --model {export_dir} builds the SavedModel when it can")
    return None


def saved_model_of(export_dir: str) -> str | None:
    path = os.path.join(export_dir, SAVED_MODEL_DIR)
    return path if os.path.exists(os.path.join(path, SERVING_META)) else None


# ----------------------------------------------------------------------------- the MLflow model
def log_pyfunc_model(mlflow, export_dir: str, pip_requirements):
    """``mlflow.pyfunc.log_model`` of an export as the run's ``model`` (``pyfunc_log_kwargs``),
    without the artifact progress bars MLflow draws while it checks the input example."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return mlflow.pyfunc.log_model(name="model", pip_requirements=list(pip_requirements),
                                       **pyfunc_log_kwargs(export_dir))
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def pyfunc_log_kwargs(export_dir: str) -> dict:
    """Arguments of ``mlflow.pyfunc.log_model`` for an export: the models-from-code file
    (``gmeta/trainer/serving/pyfunc.py``), its artifacts (the export, with its SavedModel, and the serving
    runtime), and, when the SavedModel exists, the signature (input rows, output rows, the
    ``steps`` param) and an input example."""
    here = os.path.dirname(os.path.abspath(__file__))
    kwargs = {"python_model": os.path.join(here, "pyfunc.py"),
              "artifacts": {"gmeta_model": export_dir, "runtime": os.path.join(here, "runtime.py")}}
    saved = saved_model_of(export_dir)
    if saved is None:
        return kwargs
    with open(os.path.join(saved, SERVING_META)) as f:
        serving = json.load(f)
    kwargs["signature"] = _signature(serving)
    kwargs["input_example"] = _input_example(serving)
    return kwargs


def _signature(serving: dict):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = [ColSpec("long", serving["task_column"]), ColSpec("long", serving["query_column"])]
    inputs += [ColSpec("double", lab, required=False) for lab in serving["labels"]]
    inputs += [ColSpec(Array(DataType.long) if f["max_len"] > 1 else DataType.long, f["name"])
               for f in serving["sparse"]]
    inputs += [ColSpec("double", d) for d in serving["dense"]]
    outputs = [ColSpec("long", serving["task_column"]), ColSpec("long", "row")]
    outputs += [ColSpec("float", f"{o}_{kind}") for o in serving["outputs"] for kind in ("adapted", "unadapted")]
    params = ParamSchema([ParamSpec("steps", "long", int(serving["steps"]))])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs), params=params)


def _input_example(serving: dict):
    """One task: two support rows and two query rows, every id 0 (valid in any table)."""
    import pandas as pd

    n = 4
    frame = {serving["task_column"]: [0] * n, serving["query_column"]: [0, 0, 1, 1]}
    for lab in serving["labels"]:
        frame[lab] = [1.0, 0.0, 0.0, 0.0]
    for f in serving["sparse"]:
        frame[f["name"]] = [[0] for _ in range(n)] if f["max_len"] > 1 else [0] * n
    for d in serving["dense"]:
        frame[d] = [0.0] * n
    return pd.DataFrame(frame)
