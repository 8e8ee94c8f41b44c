"""Serving what was meta-learned: a TensorFlow SavedModel that adapts to a cold user in-graph.

``write_saved_model(export_dir)`` loads a gmeta export in this process (``export.load_model``:
a LocalCommunicator and full tables) and saves ``<export>/saved_model/``, which loads with
TensorFlow alone (no gmeta, no Horovod, no custom Python objects). Signatures (T tasks, S support
rows, Q query rows, N rows, L list length: all ``None``, any size works):

``predict``                  the global (unadapted) model on plain rows
    inputs   ``<sparse feature>`` int64 rows [N] (list features [N, L], padded with -1), or for
             a feature whose table has a vocabulary its raw ids, string or int64 as the
             vocabulary's kind (padded with ``runtime.RAW_PAD``: "" or -2**63),
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
variables, which hold the whole table with one process) by the embedding's own id rule
(``embedding.base.clean_rows``, as training's lookups), zero vectors for ids < 0, so no
collective (and no Horovod op) is ever traced; ``write_saved_model`` checks the saved graph for
Horovod ops anyway. MetaEmb's generated embeddings for unseen items are part of
``build_inputs`` and so part of the graph. When the export carries the training dataset's
vocabularies (``export.copy_vocabularies``), raw ids become rows first, in the graph
(``VocabularyTable``: a ``tf.lookup.StaticHashTable`` of the vocabulary's values; an unseen id ->
the out-of-vocabulary row 0, as the dataset's converter maps it), so a client sends the team's
own ids; features without a vocabulary take rows exactly as before.

``gmeta_serving.json`` next to the SavedModel describes it for the runtime (``gmeta.trainer.
serving.runtime``, which imports no gmeta) and for the MLflow model (``pyfunc_log_kwargs``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from gmeta.io.vocab import OOV_ROW
from gmeta.trainer.embedding.base import clean_rows
from gmeta.trainer.serving.export import EXPORT_FILE, load_export_vocabularies, load_model
from gmeta.trainer.serving.runtime import (OUTPUT_KINDS, RAW_PAD, ROW_COLUMN, ROW_PAD, SERVING_META,
                                           output_column, output_columns)

SAVED_MODEL_DIR = "saved_model"
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
class _KeyRecorder(dict):
    """A dict that remembers which keys were read: which labels the inner-loop loss uses."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.used.add(key)
        return super().get(key, default)


def _probe(model, part_type=dict) -> tuple:
    """``(x, part)`` of one dummy row, to ask the model (eagerly) what it reads and scores."""
    x = tf.zeros([1, 1, model.input_width])
    part = part_type({lab: tf.zeros([1, 1]) for lab in model.schema.labels})
    part["mask"] = tf.ones([1, 1])
    return x, part


def needed_labels(learner) -> list:
    """The labels the inner-loop loss reads: only these are inputs of the support rows."""
    model = learner.model
    x, part = _probe(model, _KeyRecorder)
    model.task_loss(model.forward(learner.params(), x), part)
    return [lab for lab in model.schema.labels if lab in part.used]


def head_names(learner) -> list:
    """The heads of ``model.scores`` in order; the first is the headline (``score``)."""
    model = learner.model
    x, part = _probe(model)
    return list(model.scores(model.forward(learner.params(), x), part))


class VocabularyTable(tf.Module):
    """A vocabulary inside the graph: raw ids -> rows, an id it never saw -> the out-of-vocabulary
    row (a cold id is the normal case), the padding ``RAW_PAD`` -> -1 (no row, as for row inputs)."""

    def __init__(self, vocab):
        super().__init__()
        self.dtype = tf.string if vocab.kind == "string" else tf.int64
        self.pad = RAW_PAD[vocab.kind]
        known = vocab.values[1:].to_numpy(zero_copy_only=False)  # row 0 (OOV) holds no value
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(known, self.dtype),
                                                tf.range(1, vocab.size, dtype=tf.int64)),
            default_value=tf.constant(OOV_ROW, tf.int64))

    def rows(self, raw):
        return tf.where(tf.equal(raw, self.pad), tf.constant(ROW_PAD, tf.int64), self.table.lookup(raw))


def _check_fits(vocab, table) -> None:
    """Every row of a vocabulary exists in its table (unless the table is hashed)."""
    if not table.hashed and vocab.size > table.num_rows:
        raise ValueError(f"vocabulary {vocab.table} has {vocab.size} rows, table {table.name} only "
                         f"{table.num_rows}: the dataset's schema and vocabulary disagree; rewrite the "
                         f"dataset (gmeta convert) and retrain")


class ServingTables(tf.Module):
    """Full tables as plain variables, looked up without a collective: ids -> rows by the
    embedding's own rule (``clean_rows``), zero vectors for ids < 0. Features with a vocabulary
    (``{feature: Vocabulary}``) take raw ids, mapped to rows first (``rows``)."""

    def __init__(self, embedding, vocabularies: dict):
        super().__init__(name="serving_tables")
        self._plan = embedding.plan  # plain data: not saved
        self.tables = [self._full_table(embedding, table) for table in self._plan.tables]
        self.vocabularies = self._vocabulary_tables(vocabularies)

    def _vocabulary_tables(self, vocabularies: dict) -> dict:
        """``{feature: VocabularyTable}`` of the features the plan embeds, one table per vocabulary."""
        built = {}
        for feature, vocab in vocabularies.items():
            if feature in self._plan.features and vocab.table not in built:
                _check_fits(vocab, self._plan.table_of(feature))
                built[vocab.table] = VocabularyTable(vocab)
        return {f: built[v.table] for f, v in vocabularies.items() if f in self._plan.features}

    def input_dtype(self, feature: str):
        """What a signature takes for a feature: its vocabulary's raw ids, or int64 rows."""
        return self.vocabularies[feature].dtype if feature in self.vocabularies else tf.int64

    def rows(self, feature: str, ids):
        """A signature's ids of a feature -> table rows (raw ids through its vocabulary)."""
        return self.vocabularies[feature].rows(ids) if feature in self.vocabularies else ids

    def _full_table(self, embedding, table) -> tf.Variable:
        var = embedding.trainable_variables[self._plan.table_index(table.name)]
        if tuple(var.shape) != (table.num_rows, table.dim):
            raise ValueError(f"table {table.name}: expected the full table "
                             f"[{table.num_rows}, {table.dim}], got {var.shape}")
        return var

    def lookup(self, ids: dict) -> dict:
        """``{feature: int64 ids}`` -> ``{feature: float32 ids.shape + [dim]}``, as
        ``EmbeddingBase.lookup``."""
        return {f: self._vectors(f, v) for f, v in ids.items()}

    def _vectors(self, feature: str, ids):
        table = self._plan.table_of(feature)
        rows = clean_rows(table, tf.maximum(ids, 0), self._plan.features_of(table.name))
        vectors = tf.gather(self.tables[self._plan.table_index(table.name)], rows)
        return tf.where((ids >= 0)[..., None], vectors, tf.zeros_like(vectors))


class ServingModule(tf.Module):
    """What the SavedModel holds: variables and vocabulary tables (the traced signatures capture
    them)."""

    def __init__(self, learner, vocabularies: dict):
        super().__init__(name="gmeta_serving")
        self.lookup = ServingTables(learner.embedding, vocabularies)
        self.dense = list(learner.model.state_variables().values()) + learner.adaptation_variables()


def adapted_outputs(before: dict, after: dict) -> dict:
    """The task signatures' outputs: every output's score after and before adapting."""
    scores = {"adapted": after, "unadapted": before}
    return {output_column(name, kind): scores[kind][name] for name in before for kind in OUTPUT_KINDS}


class ServingGraph:
    """The three signatures (module docstring) traced from a loaded learner. A plain object,
    not a ``tf.Module``: only ``ServingModule``'s variables go into the SavedModel, not the
    learner's optimizer state."""

    def __init__(self, learner, module: ServingModule, labels: list, steps: int, max_steps: int):
        self.learner = learner
        self.model = learner.model
        self.schema = learner.model.schema
        self.module = module
        self.labels = labels
        self.steps = steps
        self.max_steps = max_steps

    def signatures(self) -> dict:
        """``{name: concrete function}`` of the three signatures."""
        return {name: tf.function(getattr(self, name), input_signature=[spec],
                                  autograph=False).get_concrete_function()
                for name, spec in self.input_specs().items()}

    # ---- inputs
    def input_specs(self) -> dict:
        """``{signature: its inputs' TensorSpecs}``."""
        task = {**self._feature_specs("support_", [None, None]),
                **{f"support_{lab}": tf.TensorSpec([None, None], tf.float32, name=f"support_{lab}")
                   for lab in self.labels},
                "support_mask": tf.TensorSpec([None, None], tf.float32, name="support_mask"),
                **self._feature_specs("query_", [None, None]),
                "query_mask": tf.TensorSpec([None, None], tf.float32, name="query_mask")}
        return {"predict": self._feature_specs("", [None]),
                "adapt_and_predict": task,
                "adapt_and_predict_steps": {**task, "steps": tf.TensorSpec([], tf.int32, name="steps")}}

    def _feature_specs(self, prefix: str, lead: list) -> dict:
        specs = {}
        for f in self.model.sparse_features:
            shape = lead + ([None] if self.schema.feature(f).is_list else [])
            specs[prefix + f] = tf.TensorSpec(shape, self.module.lookup.input_dtype(f), name=prefix + f)
        for d in self.model.dense_features:
            specs[prefix + d] = tf.TensorSpec(lead, tf.float32, name=prefix + d)
        return specs

    def _part(self, inputs: dict, prefix: str, with_labels: bool) -> dict:
        """The reader's view of a signature's rows: features, mask, and labels (zeros where the
        inner loop does not read them, or on rows without labels)."""
        part = {}
        for f in self.model.sparse_features:
            ids = inputs[prefix + f]
            if self.schema.feature(f).is_list:  # the reader keeps the first max_len ids
                ids = ids[..., :self.schema.feature(f).max_len]
            part[f] = self.module.lookup.rows(f, ids)
        for d in self.model.dense_features:
            part[d] = inputs[prefix + d]
        part["mask"] = inputs[prefix + "mask"]
        zeros = tf.zeros_like(part["mask"])
        for lab in self.schema.labels:
            part[lab] = inputs[prefix + lab] if with_labels and lab in self.labels else zeros
        return part

    def _model_inputs(self, part: dict):
        """The model's input rows of a part, embeddings looked up in the full tables."""
        ids = {f: part[f] for f in self.model.sparse_features}
        return self.model.build_inputs(self.module.lookup.lookup(ids), part)

    # ---- scores
    def _scores(self, params: dict, x, part: dict) -> dict:
        """``model.scores`` under the SavedModel's output names (``output_name``)."""
        return {output_name(h, i == 0): s for i, (h, (s, _)) in
                enumerate(self.model.scores(self.model.forward(params, x), part).items())}

    def _task(self, inputs: dict) -> tuple:
        """``(support, query, x_support, x_query, params)`` of a batch of tasks."""
        support = self._part(inputs, "support_", with_labels=True)
        query = self._part(inputs, "query_", with_labels=False)
        return support, query, self._model_inputs(support), self._model_inputs(query), self.learner.params()

    def _unadapted(self, task: tuple) -> dict:
        _, query, _, x_query, params = task
        return self._scores(params, x_query, query)

    def _adapted(self, task: tuple, k: int) -> dict:
        """eval_step's inner loop: the trained learner's adapt (first order: no outer gradient)."""
        support, query, x_support, x_query, params = task
        fast = self.learner.adapt(params, x_support, support, k, first_order=True)
        return self._scores(fast, x_query, query)

    # ---- the signatures
    def predict(self, inputs):
        """The global model on N plain rows (one task of N query rows)."""
        rows = {k: v[None] for k, v in inputs.items()}
        rows["mask"] = tf.ones([1, tf.shape(next(iter(inputs.values())))[0]])
        part = self._part(rows, "", with_labels=False)
        scores = self._scores(self.learner.params(), self._model_inputs(part), part)
        return {k: v[0] for k, v in scores.items()}

    def adapt_and_predict(self, inputs):
        """The trained number of inner steps on every task's support rows, then its query."""
        task = self._task(inputs)
        return adapted_outputs(self._unadapted(task), self._adapted(task, self.steps))

    def adapt_and_predict_steps(self, inputs):
        """``steps`` picks one of the ``max_steps + 1`` unrolled inner loops."""
        inputs = dict(inputs)
        n_steps = inputs.pop("steps")
        checks = [tf.debugging.assert_less_equal(n_steps, self.max_steps,
                                                 message=f"steps must be <= max_steps={self.max_steps}"),
                  tf.debugging.assert_non_negative(n_steps, message="steps must be >= 0")]
        task = self._task(inputs)
        before = self._unadapted(task)
        names = list(before)
        with tf.control_dependencies(checks):
            after = tf.switch_case(n_steps, [self._branch(task, k, names) for k in range(self.max_steps + 1)])
        return adapted_outputs(before, dict(zip(names, after)))

    def _branch(self, task: tuple, k: int, names: list):
        """The ``switch_case`` branch of ``k`` steps (``k`` bound here, not late in a loop)."""
        return lambda: [self._adapted(task, k)[n] for n in names]


def build_module(learner, steps: int, max_steps: int, vocabularies: dict):
    """``(module, signatures, labels)``: the ``tf.Module`` to save (variables and vocabulary
    tables), its three traced signatures (module docstring) and the labels the inner loop reads
    from support rows. ``vocabularies``: ``{feature: Vocabulary}`` of the features that take raw ids."""
    if learner.comm.size != 1:
        raise ValueError("write the SavedModel from a loaded export (one process, full tables)")
    labels = needed_labels(learner)
    module = ServingModule(learner, vocabularies)
    return module, ServingGraph(learner, module, labels, steps, max_steps).signatures(), labels


def horovod_ops(saved_model_dir: str) -> list:
    """Op types of the saved graph (and its functions) that come from Horovod (should be none)."""
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
    steps = trained_steps(meta)
    max_steps = max(4, steps + 3) if max_steps is None else int(max_steps)
    if max_steps < steps:
        raise ValueError(f"max_steps={max_steps} is below the trained {steps} inner steps")
    vocabularies = load_export_vocabularies(export_dir, meta)
    module, signatures, labels = build_module(learner, steps, max_steps, vocabularies)
    out_dir = out_dir or os.path.join(export_dir, SAVED_MODEL_DIR)
    _clear_out_dir(out_dir)
    tf.saved_model.save(module, out_dir, signatures=signatures)
    bad = horovod_ops(out_dir)
    if bad:
        raise RuntimeError(f"{out_dir}: the serving graph holds Horovod ops {bad}")
    serving = serving_meta(learner, meta, signatures, labels, steps, max_steps, total, vocabularies)
    with open(os.path.join(out_dir, SERVING_META), "w") as f:
        json.dump(serving, f, indent=2, sort_keys=True)
    return out_dir


def _clear_out_dir(out_dir: str) -> None:
    """Replace an older SavedModel of this export; refuse to write into anything else."""
    if os.path.exists(os.path.join(out_dir, "saved_model.pb")):
        shutil.rmtree(out_dir)
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: not empty and not a SavedModel; give an empty or new directory")


def serving_meta(learner, meta: dict, signatures: dict, labels: list, steps: int, max_steps: int,
                 total: int, vocabularies: dict) -> dict:
    """``gmeta_serving.json``: what the runtime (which imports no gmeta) and the MLflow model
    need to know about the SavedModel."""
    model, schema = learner.model, learner.model.schema
    heads = {output_name(h, i == 0): h for i, h in enumerate(head_names(learner))}
    run = meta.get("run_config", {})
    return {
        "format": FORMAT,
        "model": meta["model"],
        "target": model.target,
        "task_column": schema.task_column,
        "query_column": schema.query_column,
        "sparse": [_sparse_meta(schema, f, vocabularies.get(f)) for f in model.sparse_features],
        "dense": list(model.dense_features),
        "labels": labels,
        "item_feature": schema.item_id_feature,
        "outputs": list(heads),   # score (the headline head), score_<head> for the others
        "heads": heads,           # output -> the head's name in model.scores / the evaluation report
        "steps": steps,
        "max_steps": max_steps,
        "support_size": _size_setting(run, "support_size"),
        "query_size": _size_setting(run, "query_size"),
        "table_bytes": total,
        "signatures": {name: {"inputs": sorted(fn.structured_input_signature[0][0]),
                              "outputs": sorted(fn.structured_outputs)} for name, fn in signatures.items()},
    }


def _sparse_meta(schema, feature: str, vocab) -> dict:
    """What the runtime checks a sparse input against: its table's rows (ids of a feature without
    a vocabulary must be rows of it) or its vocabulary (kind, version, the padding, an example id)."""
    f = schema.feature(feature)
    table = schema.table(f.table)
    entry = {"name": feature, "max_len": f.max_len, "table": table.name, "num_rows": table.num_rows,
             "hashed": table.hashed, "vocabulary": None}
    if vocab is not None:
        entry["vocabulary"] = {"name": vocab.table, "kind": vocab.kind, "version": vocab.version,
                               "size": vocab.size, "pad": RAW_PAD[vocab.kind], "example": _example_id(vocab)}
    return entry


def _example_id(vocab):
    """A raw id the vocabulary knows (the input example's), or one it never saw when it knows none."""
    if vocab.size > 1:
        return vocab.raw_values([1])[0]
    return "unseen" if vocab.kind == "string" else 0


def _size_setting(run: dict, key: str) -> int:
    """A run's support / query size, 0 where it was not a number (``auto``)."""
    return int(run[key]) if str(run.get(key, "")).isdigit() else 0


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
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = [ColSpec("long", serving["task_column"]), ColSpec("long", serving["query_column"])]
    inputs += [ColSpec("double", lab, required=False) for lab in serving["labels"]]
    inputs += [ColSpec(_id_type(f), f["name"]) for f in serving["sparse"]]
    inputs += [ColSpec("double", d) for d in serving["dense"]]
    outputs = [ColSpec("long", serving["task_column"]), ColSpec("long", ROW_COLUMN)]
    outputs += [ColSpec("float", column) for column in output_columns(serving["outputs"])]
    params = ParamSchema([ParamSpec("steps", "long", int(serving["steps"]))])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs), params=params)


def _id_type(feature: dict):
    """The MLflow type of a sparse column: long (lists: an array of long) for rows and integer raw
    ids; Any for string raw ids, which the runtime checks: MLflow's parser would turn any JSON
    value sent for a string column into a string, so an integer id would be looked up as its
    digits instead of answering 400."""
    from mlflow.types import DataType
    from mlflow.types.schema import AnyType, Array

    vocab = feature.get("vocabulary")
    if vocab and vocab["kind"] == "string":
        return AnyType()
    return Array(DataType.long) if feature["max_len"] > 1 else DataType.long


def _input_example(serving: dict):
    """One task: two support rows and two query rows, every row id 0 (valid in any table) and
    every raw id a known one of its vocabulary."""
    import pandas as pd

    n = 4
    frame = {serving["task_column"]: [0] * n, serving["query_column"]: [0, 0, 1, 1]}
    for lab in serving["labels"]:
        frame[lab] = [1.0, 0.0, 0.0, 0.0]
    for f in serving["sparse"]:
        value = f["vocabulary"]["example"] if f.get("vocabulary") else 0
        frame[f["name"]] = [[value] for _ in range(n)] if f["max_len"] > 1 else [value] * n
    for d in serving["dense"]:
        frame[d] = [0.0] * n
    return pd.DataFrame(frame)
