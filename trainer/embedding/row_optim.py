"""Row-wise (sparse) optimizers for embedding tables: only the rows in the batch are touched.

A step receives ``rows`` (unique local row indices, [K]) and their summed, already scaled
gradients ``g`` ([K, dim]); rows not in ``rows`` keep their value *and* their optimizer state.
Formulas (``lr`` = learning_rate, ``eps`` = epsilon, all elementwise on the touched rows):

* ``sgd``:      w -= lr * g
* ``adagrad``:  a += g^2;  w -= lr * g / (sqrt(a) + eps);  a starts at ``initial_accumulator``
  (TF's ResourceSparseApplyAdagradV2 form).
* ``adam``, lazy (the LazyAdam convention): with ``t`` the global step counter,
  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;
  lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t);  w -= lr_t * m / (sqrt(v) + eps).
  ``t`` counts ``apply_gradients`` calls of the whole embedding (``iterations``, starting at 1
  for the first step), identical on every rank. It is *not* a per-row count: a row seen for
  the first time at step 10 is bias-corrected with t = 10, and m, v of rows absent from a
  batch are not decayed. This keeps the state O(rows touched) per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

KINDS = ("sgd", "adagrad", "adam")


@dataclass(frozen=True)
class RowOptimizerConfig:
    """Which row-wise optimizer and its hyper-parameters (see module docstring)."""

    kind: str                       # the run's --emb-optimizer
    learning_rate: float            # the run's --emb-lr
    # the optimizers' own constants (no flags; TF's values)
    initial_accumulator: float = 0.1
    epsilon: float = 1e-7
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"row optimizer kind must be one of {KINDS}, got {self.kind!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"adam betas must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.initial_accumulator < 0 or self.epsilon < 0:
            raise ValueError("initial_accumulator and epsilon must be >= 0")


def slots_per_row(kind: str) -> int:
    """Optimizer state vectors of size ``dim`` kept per row (for memory accounting)."""
    return {"sgd": 0, "adagrad": 1, "adam": 2}[kind]


class RowOptimizer(tf.Module):
    """Holds the step counter; creates slot variables and applies row updates."""

    def __init__(self, config: RowOptimizerConfig, name: str = "row_optimizer"):
        super().__init__(name=name)
        self.config = config
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")

    def create_slots(self, var: tf.Variable, prefix: str) -> dict:
        """Slot variables shaped like ``var`` (created once, outside any tf.function)."""
        c = self.config
        shape = var.shape
        if c.kind == "sgd":
            return {}
        if c.kind == "adagrad":
            return {"accumulator": tf.Variable(tf.fill(shape, tf.constant(c.initial_accumulator,
                                                                           var.dtype)),
                                               trainable=False, name=f"{prefix}/accumulator")}
        return {"m": tf.Variable(tf.zeros(shape, var.dtype), trainable=False, name=f"{prefix}/m"),
                "v": tf.Variable(tf.zeros(shape, var.dtype), trainable=False, name=f"{prefix}/v")}

    def next_step(self) -> tf.Tensor:
        """Advance the global step counter; returns the new value ``t`` (1 on the first step)."""
        return self.iterations.assign_add(1, read_value=True)

    def apply_rows(self, var: tf.Variable, slots: dict, rows: tf.Tensor, g: tf.Tensor,
                   t: tf.Tensor) -> None:
        """Update rows ``rows`` (unique, [K]) of ``var`` with gradients ``g`` ([K, dim])."""
        c = self.config
        lr = tf.constant(c.learning_rate, var.dtype)
        if c.kind == "sgd":
            var.scatter_sub(tf.IndexedSlices(lr * g, rows))
            return
        eps = tf.constant(c.epsilon, var.dtype)
        if c.kind == "adagrad":
            # one fused kernel (rows are unique, so applying them one by one is the formula)
            tf.raw_ops.ResourceSparseApplyAdagradV2(var=var.handle, accum=slots["accumulator"].handle, lr=lr,
                                                    epsilon=eps, grad=g, indices=rows, use_locking=False)
            return
        b1 = tf.constant(c.beta1, var.dtype)
        b2 = tf.constant(c.beta2, var.dtype)
        tf_t = tf.cast(t, var.dtype)
        m = b1 * tf.gather(slots["m"], rows) + (1.0 - b1) * g
        v = b2 * tf.gather(slots["v"], rows) + (1.0 - b2) * tf.square(g)
        slots["m"].scatter_update(tf.IndexedSlices(m, rows))
        slots["v"].scatter_update(tf.IndexedSlices(v, rows))
        lr_t = lr * tf.sqrt(1.0 - tf.pow(b2, tf_t)) / (1.0 - tf.pow(b1, tf_t))
        var.scatter_sub(tf.IndexedSlices(lr_t * m / (tf.sqrt(v) + eps), rows))
