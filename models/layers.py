"""Functional layers shared by the zoo.

Parameters are plain tensors in a dict, so the meta-learner can pass *fast weights* instead of
the global variables. A weight of rank 2 (``[in, out]``) is shared by all tasks; the same weight
with a leading task axis (``[T, in, out]``) is one copy per task, which is how the inner loop
adapts all T tasks of a batch in one vectorized computation.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def glorot(shape, seed: int, name: str) -> tf.Variable:
    """Deterministic Glorot-uniform init (stateless, so every rank builds the same values)."""
    fan_in, fan_out = shape[-2], shape[-1]
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    value = tf.random.stateless_uniform(shape, seed=[seed, _stable_hash(name)],
                                        minval=-limit, maxval=limit)
    return tf.Variable(value, name=name.replace("/", "_"))


def zeros(shape, name: str) -> tf.Variable:
    return tf.Variable(tf.zeros(shape), name=name.replace("/", "_"))


def _stable_hash(text: str) -> int:
    h = 0
    for ch in text.encode():
        h = (h * 131 + ch) % 2_147_483_647
    return h


def init_mlp(prefix: str, sizes, seed: int, zero_output: bool = False) -> dict:
    """Variables ``{prefix}/w{i}``, ``{prefix}/b{i}`` for a stack of dense layers ``sizes``;
    ``zero_output``: the last layer starts at zero (the stack outputs 0 until it learns, so a
    model that adds it to a prior starts exactly at the prior)."""
    params = {}
    last = len(sizes) - 2
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"{prefix}/w{i}"] = (zeros([n_in, n_out], f"{prefix}/w{i}") if zero_output and i == last
                                    else glorot([n_in, n_out], seed, f"{prefix}/w{i}"))
        params[f"{prefix}/b{i}"] = zeros([n_out], f"{prefix}/b{i}")
    return params


def dense(x, w, b, shift=None):
    """x: [T, N, in]; w: [in, out] (shared) or [T, in, out] (per task); b: [out] or [T, out].

    ``shift`` ([in] or [T, in]): inputs moved by it on every row, as ``x @ w + shift @ w``: a
    task's shift costs one [in] x [in, out] product, and its gradient a sum over rows then one
    product, where ``(x + shift) @ w`` takes a gradient product per row (inside an inner loop,
    and again in its second-order backward)."""
    if w.shape.rank == 2:  # one matmul over all tasks' rows
        y = tf.reshape(tf.linalg.matmul(tf.reshape(x, [-1, x.shape[-1]]), w),
                       tf.concat([tf.shape(x)[:-1], tf.shape(w)[-1:]], 0))
    else:
        y = tf.linalg.matmul(x, w)
    if shift is not None:
        b = b + _times(shift, w)
    if b.shape.rank == 1:
        return y + b
    return y + b[:, None, :]


def _times(shift, w):
    """``shift @ w`` for shift [in] or [T, in] and w [in, out] or [T, in, out]: [out] or [T, out]."""
    if w.shape.rank == 2:
        return tf.linalg.matmul(shift[None], w)[0] if shift.shape.rank == 1 else tf.linalg.matmul(shift, w)
    return tf.linalg.matvec(w, shift, transpose_a=True)


def mlp(params: dict, prefix: str, x, n_layers: int, activation=tf.nn.relu, shift=None):
    """Apply ``n_layers`` dense layers; activation after every layer but the last. ``shift``:
    the first layer's inputs moved by it (``dense``)."""
    h = x
    for i in range(n_layers):
        h = dense(h, params[f"{prefix}/w{i}"], params[f"{prefix}/b{i}"], shift if i == 0 else None)
        if i < n_layers - 1:
            h = activation(h)
    return h


def pool_list(vectors, ids):
    """Mean of the valid (id >= 0) vectors of a list feature: [T, N, L, D] -> [T, N, D]."""
    valid = tf.cast(ids >= 0, vectors.dtype)[..., None]
    total = tf.reduce_sum(vectors * valid, axis=-2)
    count = tf.maximum(tf.reduce_sum(valid, axis=-2), 1.0)
    return total / count


def masked_task_mean(values, mask):
    """Per-task mean over real rows: values, mask [T, N] -> [T]."""
    return tf.reduce_sum(values * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


def bce_with_logits(labels, logits):
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)


def bce_on_probs(labels, probs, eps=1e-7):
    probs = tf.clip_by_value(probs, eps, 1.0 - eps)
    return -(labels * tf.math.log(probs) + (1.0 - labels) * tf.math.log(1.0 - probs))
