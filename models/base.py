"""The contract every zoo model fulfils, and the input assembly they share.

A model owns its *dense* parameters (a dict of ``tf.Variable``) and a functional forward pass
over a parameter dict, so the meta-learner can substitute fast weights. Embedding tables are not
part of the model: the trainer builds them (sharded or replicated) from ``embedding_tables()``
and hands the looked-up vectors to ``build_inputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tensorflow as tf

from gmeta.models import layers


@dataclass(frozen=True)
class ModelConfig:
    emb_dim: int = 16
    hidden: tuple = (64, 64)
    target: str = "auto"          # melu: click | rating; auto = click when present
    seed: int = 0
    extra: dict = field(default_factory=dict, hash=False, compare=False)


class ZooModel(tf.Module):
    """Base class. Subclasses set ``name``/``paper``, create ``self.params`` and ``self.adapted``."""

    name = "base"
    paper = ""
    #: sparse features the model never embeds (e.g. MeLU does not use the raw user id)
    skip_features: tuple = ()

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

    # ---- forward ----
    def build_inputs(self, vectors: dict, part: dict):
        """Concatenate looked-up vectors (list features mean-pooled) and dense features: [T, N, W]."""
        cols = []
        for f in self.sparse_features:
            v = vectors[f]
            if self.schema.feature(f).is_list:
                v = layers.pool_list(v, part[f])
            cols.append(v)
        for d in self.dense_features:
            cols.append(part[d][..., None])
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
