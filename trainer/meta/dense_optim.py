"""Adam for the replicated dense parameters (outer loop).

Written against plain ``tf.Variable``s: Keras 3 optimizers expect Keras variables, and every
rank must apply bit-identical updates to identical (already all-reduced) gradients.
"""

from __future__ import annotations

import tensorflow as tf


class Adam(tf.Module):
    def __init__(self, variables, learning_rate=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8, names=None):
        super().__init__(name="dense_adam")
        self.variables_ = list(variables)
        self.names = list(names) if names is not None else [f"v{i}" for i in range(len(self.variables_))]
        if len(self.names) != len(self.variables_):
            raise ValueError(f"Adam got {len(self.names)} names for {len(self.variables_)} variables")
        self.lr, self.beta1, self.beta2, self.epsilon = learning_rate, beta1, beta2, epsilon
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False, name="m") for v in self.variables_]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False, name="v") for v in self.variables_]

    def state_variables(self) -> dict:
        """The step counter and both moments of every variable, by the variables' names."""
        state = {"step": self.step}
        for name, m, v in zip(self.names, self.m, self.v):
            state[f"m/{name}"] = m
            state[f"v/{name}"] = v
        return state

    def apply(self, grads) -> None:
        """One Adam step of every variable: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
        ``var -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``, one fused kernel per
        variable (TensorFlow's ApplyAdam; as a dozen elementwise ops per variable it was 150 of
        a MeLU step's ops)."""
        step = self.step.assign_add(1, read_value=True)
        t = tf.cast(step, tf.float32)
        lr, b1, b2, eps = (tf.constant(x, tf.float32) for x in (self.lr, self.beta1, self.beta2, self.epsilon))
        b1_power, b2_power = b1 ** t, b2 ** t
        for var, g, m, v in zip(self.variables_, grads, self.m, self.v):
            tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=b1_power,
                                         beta2_power=b2_power, lr=lr, beta1=b1, beta2=b2, epsilon=eps,
                                         grad=tf.cast(g, var.dtype), use_locking=False)
