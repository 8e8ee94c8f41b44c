"""The contract every zoo model fulfils, and the input assembly they share.

A model owns its *dense* parameters (a dict of ``tf.Variable``) and a functional forward pass
over a parameter dict, so the meta-learner can substitute fast weights. Embedding tables are not
part of the model: the trainer builds them (sharded or replicated) for ``sparse_features`` from
the schema and hands the looked-up vectors to ``build_inputs``. What defines a trained model is
listed by name in one place, ``state_variables`` (plus ``plain_state`` for Python switches), so
export and checkpoints never need to know which model they hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf

from gmeta.models import layers

#: what the inner loop may adapt per task (``--adapt``, any combination):
#:   head  every layer of the decision MLP (towers, for MAML-ESMM)
#:   last  only the output layer of the MLP (towers)
#:   user  a shift of the task's user-group input columns: the user's embedding rows (and user
#:         dense features) as local copies, starting at the looked-up values
#:   pref  a per-task preference vector over the item-group input columns, added to the output
#:         logit as <pref, item columns>: a linear model of the user's taste in the learned item
#:         representation, starting at a meta-learned shared vector
#:   bias  a per-task scale and bias of the output logit (the user's level and sharpness; never
#:         changes the order of a task's items)
ADAPT_PARTS = ("head", "last", "user", "pref", "bias")
#: a rating at or above this is "liked": the relevance of rating targets in ranking metrics
LIKED_RATING = 4.0
#: the item prior's shrinkage: an item's mean label counts this many pseudo-rows of the global mean
ITEM_PRIOR_WEIGHT = 10.0
#: ``--adapt auto``: measured best on the synthetic regimes (README, "What a run reports"); ``user``
#: is dropped for a model whose inputs have no user-group column
AUTO_ADAPT = ("user", "pref", "bias")


@dataclass(frozen=True)
class ModelConfig:
    """A zoo model's settings. No defaults: the trainer builds it from the run's config
    (``gmeta.trainer.config.model_config``)."""

    emb_dim: int
    hidden: tuple
    target: str                   # melu: click | rating; auto = click when present
    seed: int
    adapt: tuple                  # see ADAPT_PARTS
    item_prior: bool              # add the item's smoothed training mean (fit_item_prior) to the output
    extra: dict = field(hash=False, compare=False)  # --extra KEY=VALUE: a model's own settings

    def __post_init__(self):
        unknown = sorted(set(self.adapt) - set(ADAPT_PARTS) - ({"auto"} if tuple(self.adapt) == ("auto",) else set()))
        if unknown or not self.adapt:
            raise ValueError(f"--adapt {','.join(self.adapt)}: choose one or more of {', '.join(ADAPT_PARTS)}")
        if {"head", "last"} <= set(self.adapt):
            raise ValueError("--adapt: head already includes last; give one of them")


@dataclass(frozen=True)
class TrainingPhase:
    """A training phase a model offers after meta-training (MetaEmb's generator is one).

    The model says what to train and on what loss; the trainer (``gmeta.trainer.meta.phases``) runs
    it with the step's scaling rule, so models never import the trainer.

    ``loss_sum(vectors, params, batch) -> (sum of per-task losses, count)``: ``vectors`` are the
    looked-up embeddings of support and query rows joined along the row axis
    (``{feature: [T, S+Q, D]}``, constants here), ``params`` the frozen dense parameters.
    ``needs_values``: columns whose distinct training values the trainer reads from the data and
    hands to ``finish`` (e.g. which items were seen in training).
    ``finish(trained, values)``: called once whether or not the phase ran (``trained`` says).
    """

    name: str
    variables: tuple
    loss_sum: Callable
    finish: Callable
    needs_values: tuple = ()


@dataclass(frozen=True)
class RowGenerator:
    """A model that can make a table's row from other features (MetaEmb: an item's id
    embedding from its side features) says which: a warm start (``--init-from``) whose
    vocabulary grew gives the new rows of ``table`` what ``generate(vectors, part)`` makes of
    each new id's first row in the data (``key``: the id feature; ``sparse``/``dense``: the
    features it reads), instead of random initial rows."""

    table: str
    key: str
    sparse: tuple
    dense: tuple
    generate: Callable


class ZooModel(tf.Module):
    """Base class. Subclasses set ``name``/``paper``, create ``self.params`` and ``self.adapted``."""

    #: the output the per-task terms (pref, bias) act on: the one a closed-form solve targets
    task_output = "out"

    name = "base"
    paper = ""
    #: sparse features the model never embeds (e.g. MeLU does not use the raw user id)
    skip_features: tuple = ()
    #: the label the headline score predicts: "click" (a probability) or "rating" (a value)
    target: str = "click"
    #: the ``--extra KEY=VALUE`` keys the model reads (anything else is an error)
    extra_keys: tuple = ()

    def __init__(self, schema, config: ModelConfig):
        super().__init__(name=self.name)
        unknown = sorted(set(config.extra) - set(self.extra_keys))
        if unknown:
            raise ValueError(f"--extra {', '.join(unknown)}: not a setting of model {self.name}; its --extra keys "
                             f"are {list(self.extra_keys) or 'none'}")
        self.schema = schema
        self.config = config
        self.sparse_features = tuple(f.name for f in schema.sparse if f.name not in self.skip_features)
        self.dense_features = tuple(d.name for d in schema.dense)
        self.params: dict = {}
        self.adapted: tuple = ()
        item = schema.item_id_feature
        self.prior_feature = item if config.item_prior and item and not schema.feature(item).is_list else None
        if config.item_prior and self.prior_feature is None:
            raise ValueError("--item-prior needs the schema's item_id_feature, single-valued")
        if self.prior_feature:
            self.item_table = schema.table(schema.feature(item).table)
            self.item_prior = tf.Variable(tf.zeros([self.item_table.num_rows]), trainable=False, name="item_prior")

    # ---- what the trainer needs to know ----
    def embedding_tables(self) -> dict:
        """{feature: table} for the features this model looks up."""
        return {f: self.schema.feature(f).table for f in self.sparse_features}

    @property
    def input_width(self) -> int:
        return (self.config.emb_dim * len(self.sparse_features) + len(self.dense_features)
                + (1 if self.prior_feature else 0))

    def adapted_names(self) -> tuple:
        return self.adapted

    # ---- per-task terms the inner loop can adapt (ADAPT_PARTS user, pref, bias) ----
    def adapt_parts(self) -> tuple:
        """What adapts: ``config.adapt``, with ``auto`` resolved for this model and schema."""
        if tuple(self.config.adapt) != ("auto",):
            return tuple(self.config.adapt)
        has_user = (self.column_groups() == "user").any()
        return tuple(p for p in AUTO_ADAPT if p != "user" or has_user)

    def _add_task_terms(self) -> tuple:
        """Create the parameters of the requested per-task terms; returns their names (to adapt)."""
        parts = set(self.adapt_parts())
        width = self.input_width
        names = []
        if "user" in parts:
            self.params["task/user_shift"] = layers.zeros([width], "task/user_shift")
            names.append("task/user_shift")
        if "pref" in parts:
            self.params["task/pref"] = layers.zeros([width], "task/pref")
            names.append("task/pref")
        if "bias" in parts:
            self.params["task/bias"] = layers.zeros([], "task/bias")
            self.params["task/scale"] = tf.Variable(1.0, name="task_scale")
            names += ["task/bias", "task/scale"]
        groups = self.column_groups()
        self._user_cols = tf.constant(groups == "user", tf.float32)
        self._item_cols = tf.constant(groups == "item", tf.float32)
        item_index = np.flatnonzero(groups == "item")
        self._item_index = tf.constant(item_index, tf.int32)
        self._n_item_cols = int(item_index.size)
        # the item columns as one slice when they are contiguous (features are concatenated in
        # schema order, so they usually are): a gather on the last axis was the default step's
        # costliest op (0.36 ms of 7.0)
        contiguous = item_index.size > 0 and item_index[-1] - item_index[0] + 1 == item_index.size
        self._item_slice = (int(item_index[0]), int(item_index[-1]) + 1) if contiguous else None
        if "user" in parts and not (groups == "user").any():
            raise ValueError(f"--adapt user: the schema has no user-group feature among {self.sparse_features}")
        if "pref" in parts and not (groups == "item").any():
            raise ValueError("--adapt pref: the schema has no item-group feature")
        return tuple(names)

    def column_groups(self):
        """The group (user | item | context) of every input column, in build_inputs order."""
        groups = []
        for f in self.sparse_features:
            groups += [self.schema.feature(f).group] * self.config.emb_dim
        groups += [d.group for d in self.schema.dense if d.name in self.dense_features]
        groups += ["prior"] if self.prior_feature else []
        return np.array(groups)

    def _item_columns(self, t):
        """The item-group columns of ``t`` (last axis). Contiguous ones are cut with a split: its
        gradient is one concat, where a slice's (StridedSliceGrad, a strided fill of all of
        ``t``) cost 0.6 ms of a 7 ms MeLU step when ``t`` is the task's inputs."""
        if self._item_slice is None:
            return tf.gather(t, self._item_index, axis=-1)
        lo, hi = self._item_slice
        width = t.shape[-1]
        if width is None:
            return t[..., lo:hi]
        if (lo, hi) == (0, width):
            return t
        return tf.split(t, [lo, hi - lo, width - hi], axis=-1)[1]

    def user_shift(self, params: dict):
        """The task's shift of the user columns ([W] shared or [T, W]), or None (``user`` does
        not adapt)."""
        shift = params.get("task/user_shift")
        return None if shift is None else shift * self._user_cols

    def task_inputs(self, params: dict, x):
        """The inputs with the task's user shift applied (when ``user`` adapts)."""
        shift = self.user_shift(params)
        if shift is None:
            return x
        return x + (shift if shift.shape.rank == 1 else shift[:, None, :])

    def linear_task_terms(self) -> tuple:
        """The adapted per-task terms the task output is linear in (``pref``, ``bias``), which
        ``--inner-solver ridge`` solves in closed form on the support rows."""
        return tuple(n for n in ("task/pref", "task/bias") if n in self.adapted)

    def stepped_task_terms(self, solved: tuple) -> tuple:
        """The adapted terms that take gradient steps when ``solved`` are solved in closed form;
        the logit's scale (the task's sharpness, which has no closed form) stays at its shared,
        meta-learned value when the bias is solved, so a rating task's solve is exact."""
        keep_shared = {"task/scale"} if "task/bias" in solved else set()
        return tuple(n for n in self.adapted if n not in solved and n not in keep_shared)

    def linear_task_width(self) -> int:
        """K, the coefficients the closed-form solve works on: the preference's item-group
        columns (the others never reach the output) and the bias."""
        terms = self.linear_task_terms()
        return (self._n_item_cols if "task/pref" in terms else 0) + (1 if "task/bias" in terms else 0)

    def linear_task_values(self, params: dict, n_tasks):
        """The linear task terms' current coefficients per task: ``[T, K]`` (shared values are
        broadcast over the tasks)."""
        cols = []
        for name in self.linear_task_terms():
            v = params[name]
            if name == "task/pref":
                v = self._item_columns(v)
            else:
                v = v[..., None]
            cols.append(tf.broadcast_to(v, tf.stack([n_tasks, tf.shape(v)[-1]])) if v.shape.rank == 1 else v)
        return tf.concat(cols, axis=-1)

    def with_linear_task_values(self, fast: dict, values) -> dict:
        """The linear task terms with their coefficients set to ``values`` ``[T, K]`` (the
        preference's other columns keep their values: they never reach the output)."""
        out, start = {}, 0
        for name in self.linear_task_terms():
            if name == "task/pref":
                k = self._n_item_cols
                new = values[:, start:start + k]
                if self._item_slice is not None:
                    lo, hi = self._item_slice
                    pref = tf.concat([fast[name][:, :lo], new, fast[name][:, hi:]], axis=-1)
                else:
                    pref = tf.transpose(tf.tensor_scatter_nd_update(
                        tf.transpose(fast[name]), self._item_index[:, None], tf.transpose(new)))
                out[name], start = pref, start + k
            else:
                out[name], start = values[:, start], start + 1
        return out

    def task_design(self, params: dict, x):
        """d(task output) / d(linear task coefficients) for every row: ``[T, N, K]`` in
        ``linear_task_values`` order (the output is exactly linear in them, so a change ``delta``
        of the coefficients changes the output by ``design @ delta``)."""
        x = self.task_inputs(params, x)
        scale = params.get("task/scale", tf.constant(1.0))
        scale = scale[:, None, None] if scale.shape.rank == 1 else scale
        cols = []
        for name in self.linear_task_terms():
            if name == "task/pref":
                cols.append(scale * self._item_columns(x))
            else:
                cols.append(tf.ones_like(x[..., :1]))
        return tf.concat(cols, axis=-1)

    def output_derivatives(self, outputs: dict, part: dict):
        """``(g, w)`` [T, N]: the first and second derivative of each task's summed support loss
        (``task_loss`` x rows) in ``outputs[task_output]``, or None to have the learner take them
        by automatic differentiation; a model with a known loss gives them in closed form."""
        return None

    def task_logit(self, params: dict, x, logit):
        """``logit`` with the task's preference term and scale/bias applied (when they adapt)."""
        pref = params.get("task/pref")
        if pref is not None:
            pref = pref * self._item_cols
            logit = logit + tf.linalg.matvec(x, pref)   # pref [W] (shared) or [T, W] (per task)
        if self.prior_feature:
            # the prior column depends on no parameter (the user shift skips it), so no gradient
            # flows through it: stop_gradient spares a zero-filled gradient of all of x
            logit = logit + tf.stop_gradient(x[..., -1])
        if "task/scale" in params:
            scale, bias = params["task/scale"], params["task/bias"]
            if scale.shape.rank == 1:
                scale, bias = scale[:, None], bias[:, None]
            logit = scale * logit + bias
        return logit

    # ---- state: what defines a trained model, by name ----
    def state_variables(self) -> dict:
        """Every variable of the model by name (``params/<name>`` for the dense parameters);
        subclasses with more state extend it. Export and checkpoints use only this."""
        state = {f"params/{n}": v for n, v in self.params.items()}
        if self.prior_feature:
            state["item_prior"] = self.item_prior
        return state

    def plain_state(self) -> dict:
        """JSON-able attributes that change how the model computes (none by default)."""
        return {}

    def load_plain_state(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.plain_state()))
        if unknown:
            raise ValueError(f"model {self.name}: unknown state entries {unknown}")

    def fit_target(self, values) -> None:
        """Statistics of the training split's target column a model may learn relative to (the
        trainer calls it once, with the same values on every rank); none by default."""

    def prior_offset(self, mean, global_mean):
        """An item's smoothed mean label as an offset of the task output from the global mean's
        (log-odds for clicks; a model with another output scale overrides it)."""
        eps = 1e-4
        logit = lambda p: np.log(np.clip(p, eps, 1 - eps) / (1 - np.clip(p, eps, 1 - eps)))
        return logit(mean) - logit(global_mean)

    def fit_item_prior(self, item_ids, labels) -> None:
        """``--item-prior``: per item row the smoothed mean training label (ITEM_PRIOR_WEIGHT
        pseudo-rows of the global mean), as the output offset ``prior_offset``; rows never seen in
        training get 0. The trainer calls it once, with the same rows on every rank."""
        if not self.prior_feature:
            return
        ids = np.asarray(item_ids).ravel()
        labels = np.asarray(labels, np.float64).ravel()
        n = self.item_table.num_rows
        rows = np.asarray(self.item_table.rows_of(np.maximum(ids, 0)))
        # an id outside the table is the reader's to report (with its file and stripe)
        keep = (ids >= 0) & (rows < n)
        rows = rows[keep]
        total, count = np.bincount(rows, labels[keep], n), np.bincount(rows, minlength=n)
        global_mean = float(labels[keep].mean()) if keep.any() else 0.0
        mean = (total + ITEM_PRIOR_WEIGHT * global_mean) / (count + ITEM_PRIOR_WEIGHT)
        self.item_prior.assign(np.where(count > 0, self.prior_offset(mean, global_mean), 0.0).astype(np.float32))

    def training_phases(self) -> tuple:
        """Extra ``TrainingPhase``s run after meta-training (none by default)."""
        return ()

    def row_generator(self):
        """A ``RowGenerator`` for new rows of a grown table, or None (initial rows)."""
        return None

    # ---- forward ----
    def build_inputs(self, vectors: dict, part: dict):
        """Looked-up vectors of every embedded feature and every dense feature, and the item
        prior (``--item-prior``) as the last column: [T, N, W]."""
        x = self.concat_features(vectors, part, self.sparse_features, self.dense_features)
        if not self.prior_feature:
            return x
        ids = part[self.prior_feature]
        prior = tf.gather(self.item_prior, self.item_table.rows_of(tf.maximum(ids, 0)))
        return tf.concat([x, (prior * tf.cast(ids >= 0, tf.float32))[..., None]], axis=-1)

    def concat_features(self, vectors: dict, part: dict, sparse, dense):
        """Concatenate the vectors of ``sparse`` (list features mean-pooled over valid ids) and
        the ``dense`` columns: [T, N, dim * len(sparse) + len(dense)]."""
        cols = []
        for f in sparse:
            v = vectors[f]
            if self.schema.feature(f).is_list:
                v = layers.pool_list(v, part[f])
            cols.append(v)
        cols += [part[d][..., None] for d in dense]
        return tf.concat(cols, axis=-1)

    def forward(self, params: dict, x) -> dict:
        raise NotImplementedError

    def task_loss(self, outputs: dict, part: dict):
        """Per-task mean loss over real rows: [T]."""
        raise NotImplementedError

    def scores(self, outputs: dict, part: dict) -> dict:
        """{metric: (score [T, N], binary label [T, N])}; the first entry is the headline AUC."""
        raise NotImplementedError

    def relevance(self, part: dict):
        """The headline metric's binary label of every row of ``part`` (tensors or numpy arrays):
        the click label, or for a rating target whether the rating is at least LIKED_RATING."""
        if self.target == "rating":
            return part["rating"] >= LIKED_RATING
        return part[self.target] > 0.5

    def describe(self) -> dict:
        return {"model": self.name, "paper": self.paper, "adapt": list(self.adapt_parts()),
                "adapted": list(self.adapted),
                "dense_params": {k: v.shape.as_list() for k, v in self.params.items()}}


def resolve_target(schema, requested: str) -> str:
    if requested == "auto":
        return "click" if "click" in schema.labels else "rating"
    if requested not in schema.labels:
        raise ValueError(f"--target {requested!r}: the dataset has labels {list(schema.labels)}")
    return requested
