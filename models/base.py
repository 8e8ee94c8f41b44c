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

import tensorflow as tf

from gmeta.models import layers


@dataclass(frozen=True)
class ModelConfig:
    emb_dim: int = 16
    hidden: tuple = (64, 64)
    target: str = "auto"          # melu: click | rating; auto = click when present
    seed: int = 0
    extra: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class TrainingPhase:
    """A training phase a model offers after meta-training (MetaEmb's generator is one).

    The model says what to train and on what loss; the trainer (``gmeta.trainer.phases``) runs
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


class ZooModel(tf.Module):
    """Base class. Subclasses set ``name``/``paper``, create ``self.params`` and ``self.adapted``."""

    name = "base"
    paper = ""
    #: sparse features the model never embeds (e.g. MeLU does not use the raw user id)
    skip_features: tuple = ()
    #: the label the headline score predicts: "click" (a probability) or "rating" (a value)
    target: str = "click"

    def __init__(self, schema, config: ModelConfig):
        super().__init__(name=self.name)
        self.schema = schema
        self.config = config
        self.sparse_features = tuple(f.name for f in schema.sparse if f.name not in self.skip_features)
        self.dense_features = tuple(d.name for d in schema.dense)
        self.params: dict = {}
        self.adapted: tuple = ()

    # ---- what the trainer needs to know ----
    def embedding_tables(self) -> dict:
        """{feature: table} for the features this model looks up."""
        return {f: self.schema.feature(f).table for f in self.sparse_features}

    @property
    def input_width(self) -> int:
        return self.config.emb_dim * len(self.sparse_features) + len(self.dense_features)

    def adapted_names(self) -> tuple:
        return self.adapted

    # ---- state: what defines a trained model, by name ----
    def state_variables(self) -> dict:
        """Every variable of the model by name (``params/<name>`` for the dense parameters);
        subclasses with more state extend it. Export and checkpoints use only this."""
        return {f"params/{n}": v for n, v in self.params.items()}

    def plain_state(self) -> dict:
        """JSON-able attributes that change how the model computes (none by default)."""
        return {}

    def load_plain_state(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.plain_state()))
        if unknown:
            raise ValueError(f"model {self.name}: unknown state entries {unknown}")

    def training_phases(self) -> tuple:
        """Extra ``TrainingPhase``s run after meta-training (none by default)."""
        return ()

    # ---- forward ----
    def build_inputs(self, vectors: dict, part: dict):
        """Looked-up vectors of every embedded feature and every dense feature: [T, N, W]."""
        return self.concat_features(vectors, part, self.sparse_features, self.dense_features)

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

    def describe(self) -> dict:
        return {"model": self.name, "paper": self.paper, "adapted": list(self.adapted),
                "dense_params": {k: v.shape.as_list() for k, v in self.params.items()}}


def resolve_target(schema, requested: str) -> str:
    if requested == "auto":
        return "click" if "click" in schema.labels else "rating"
    if requested not in schema.labels:
        raise ValueError(f"--target {requested!r}: the dataset has labels {list(schema.labels)}")
    return requested
