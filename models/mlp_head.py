"""A feature-embedding MLP with one output head: the shared body of MeLU and MAML-DNN.

A rating target is learned standardised: the network's output predicts ``(rating - mean) / std``
of the training split (``fit_target``), so one set of learning rates serves click and rating
targets alike; scores are turned back into ratings for the metrics.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gmeta.models import layers
from gmeta.models.base import ZooModel, resolve_target


class MLPHeadModel(ZooModel):
    """Embeddings + dense features -> MLP -> one logit (click) or one value (rating)."""

    extra_keys = ("adapt_layers",)

    def __init__(self, schema, config):
        super().__init__(schema, config)
        self.target = resolve_target(schema, config.target)
        sizes = [self.input_width, *config.hidden, 1]
        self.n_layers = len(sizes) - 1
        # with the item prior the network starts at it exactly (its output layer at zero)
        self.params = layers.init_mlp("mlp", sizes, config.seed, zero_output=bool(self.prior_feature))
        # which layers adapt per task: every decision layer (head), only the output layer (last),
        # or as many last layers as --extra adapt_layers says (kept for older runs)
        parts = set(self.adapt_parts())
        k = self.n_layers if "head" in parts else (1 if "last" in parts else 0)
        k = int(config.extra.get("adapt_layers", k))
        if not 0 <= k <= self.n_layers:
            raise ValueError(f"--extra adapt_layers={k}: must be in [0, {self.n_layers}]")
        first = self.n_layers - k
        layer_names = [f"mlp/{p}{i}" for i in range(first, self.n_layers) if k for p in "wb"]
        self.adapted = tuple(sorted(layer_names)) + self._add_task_terms()
        if self.target == "rating":   # (mean, std) of the training ratings; fit_target sets them
            self.target_stats = tf.Variable([0.0, 1.0], trainable=False, name="target_stats")

    def fit_target(self, values) -> None:
        """Standardise a rating target with the training split's ratings (a no-op for clicks)."""
        if self.target == "rating":
            values = np.asarray(values, np.float64)
            std = float(values.std()) if values.size > 1 else 1.0
            self.target_stats.assign([float(values.mean()) if values.size else 0.0, std if std > 0 else 1.0])

    def prior_offset(self, mean, global_mean):
        if self.target == "rating":   # in the standardised units the output predicts
            return (mean - global_mean) / float(self.target_stats[1].numpy())
        return super().prior_offset(mean, global_mean)

    def state_variables(self) -> dict:
        state = super().state_variables()
        if self.target == "rating":
            state["target_stats"] = self.target_stats
        return state

    def forward(self, params, x):
        # the user shift (when it adapts) enters through the first layer only: it moves no
        # column the logit's other terms read (item columns, the prior)
        out = tf.squeeze(layers.mlp(params, "mlp", x, self.n_layers, shift=self.user_shift(params)), -1)
        return {"out": self.task_logit(params, x, out)}

    def task_loss(self, outputs, part):
        if self.target == "rating":
            per_row = tf.square(outputs["out"] - (part["rating"] - self.target_stats[0]) / self.target_stats[1])
        else:
            per_row = layers.bce_with_logits(part[self.target], outputs["out"])
        return layers.masked_task_mean(per_row, part["mask"])

    def output_derivatives(self, outputs, part):
        out, mask = outputs["out"], part["mask"]
        if self.target == "rating":
            target = (part["rating"] - self.target_stats[0]) / self.target_stats[1]
            return 2.0 * (out - target) * mask, 2.0 * mask
        p = tf.sigmoid(out)
        return (p - part[self.target]) * mask, p * (1.0 - p) * mask

    def scores(self, outputs, part):
        if self.target == "rating":
            # ranking quality of predicted ratings against "liked" (rating >= 4)
            rating = self.target_stats[0] + self.target_stats[1] * outputs["out"]
            return {"auc": (rating, tf.cast(self.relevance(part), tf.float32))}
        return {"auc": (tf.sigmoid(outputs["out"]), part[self.target])}
