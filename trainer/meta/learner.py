"""The meta-learner: MAML's two loops, vectorized over the tasks of a batch.

One meta-step (``train_step``), top to bottom:
  1. one embedding lookup for support and query together (hybrid mode: one AlltoAll round trip
     of ids and vectors; no collective anywhere else until step 5);
  2. inner loop: ``inner_steps`` steps on each task's support loss, with the adapted parameters
     held as fast weights ``[T, ...]`` so all T tasks adapt in one computation: gradient steps,
     or (``inner_solver="ridge"``) for the terms the output is linear in (the preference over the
     item representation and the bias) a Newton step of the support loss plus a learned ridge
     penalty towards the shared values, solved in closed form (exact in one step for a squared
     loss; one IRLS step for a logistic one) and differentiated by ``spd_solve``'s own gradient;
  3. query loss with the adapted weights, summed over this rank's real tasks;
  4. meta-gradients, second order by default (the inner gradient is itself differentiated),
     first order on request (inner gradients treated as constants);
  5. ONE fused allreduce (``comm.sum_for_global_mean``, the scaling rule of comm.py) sums the
     dense meta-gradients, the replicated baseline's table gradients (none for sharded tables)
     and every rank's count of real tasks with query rows; everything steps with sum / global
     count, the exact global mean: Adam for the dense parameters, the row-wise optimizer for the
     embedding rows (whose gradients the AlltoAll backward pass already summed at their owners).

``meta="none"`` trains the same network plainly on all rows (support and query), the non-meta
baseline. ``task_loop=True`` adapts tasks one at a time (the DMAML-style baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from gmeta.trainer.evaluation.rows import label_key, score_key
from gmeta.trainer.meta.dense_optim import Adam

INNER_SOLVERS = ("gradient", "ridge")


@dataclass(frozen=True)
class MetaConfig:
    """The meta-learner's settings. No defaults: built from the run's config only
    (``gmeta.trainer.config.meta_config``), so every learner trains what the command line says."""

    meta: str                   # maml | none
    inner_steps: int
    inner_lr: float
    first_order: bool
    meta_sgd: bool              # learn the inner learning rate per parameter entry
    task_loop: bool             # adapt tasks one by one (baseline for the vectorized loop)
    outer_lr: float
    clip_norm: float            # outer loop: clip the dense meta-gradient's global norm (0 = off)
    plain_weight: float         # outer loss += this x the unadapted loss on support and query rows
    inner_clip: float           # inner loop: clip each task's gradient norm (0 = off)
    inner_solver: str           # gradient | ridge (closed form for the linear task terms)
    ridge_lambda: float         # ridge: the penalty's initial value (learned in the outer loop)

    def validate(self) -> "MetaConfig":
        if self.meta not in ("maml", "none"):
            raise ValueError(f"--meta must be maml or none, got {self.meta!r}")
        if self.inner_solver not in INNER_SOLVERS:
            raise ValueError(f"--inner-solver must be one of {', '.join(INNER_SOLVERS)}, got {self.inner_solver!r}")
        if not self.ridge_lambda > 0:
            raise ValueError(f"--ridge-lambda must be > 0, got {self.ridge_lambda}")
        if self.inner_steps < 0:
            raise ValueError(f"--inner-steps must be >= 0, got {self.inner_steps}")
        if not self.inner_lr > 0:
            raise ValueError(f"--inner-lr must be > 0, got {self.inner_lr}")
        if not self.outer_lr > 0:
            raise ValueError(f"--outer-lr must be > 0, got {self.outer_lr}")
        if self.plain_weight < 0:
            raise ValueError(f"--plain-loss-weight must be >= 0, got {self.plain_weight}")
        if self.clip_norm < 0 or self.inner_clip < 0:
            raise ValueError("--clip-norm and --inner-clip must be >= 0 (0 = off)")
        return self


def batch_spec(batch) -> dict:
    """The ``tf.TensorSpec`` structure of a meta-batch (static shapes: one trace per shape)."""
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), batch)


def _clip_per_task(grads: dict, max_norm: float) -> dict:
    """Scale each task's gradient (over all its fast weights [T, ...]) to norm <= max_norm."""
    sq = tf.add_n([tf.reduce_sum(tf.square(tf.reshape(g, [tf.shape(g)[0], -1])), axis=1)
                   for g in grads.values()])
    factor = max_norm / tf.maximum(tf.sqrt(sq), max_norm)                       # [T]
    return {n: g * tf.reshape(factor, tf.concat([[-1], tf.ones([tf.rank(g) - 1], tf.int32)], 0))
            for n, g in grads.items()}


@tf.custom_gradient
def spd_solve(matrix, rhs):
    """``matrix^-1 rhs`` for symmetric positive definite ``[..., K, K]`` matrices, by Cholesky.
    Its gradient reuses the factor: ``d rhs = matrix^-1 dy`` (one more solve) and
    ``d matrix = -d rhs x^T``; automatic differentiation through ``cholesky`` and
    ``cholesky_solve`` costs the Cholesky gradient and four triangular solves more."""
    factor = tf.linalg.cholesky(matrix)
    x = tf.linalg.cholesky_solve(factor, rhs)

    def grad(dy):
        d_rhs = tf.linalg.cholesky_solve(factor, dy)
        return -tf.linalg.matmul(d_rhs, x, transpose_b=True), d_rhs

    return x, grad


def _concat_parts(a: dict, b: dict) -> dict:
    """Join support and query rows of a batch along the sample axis (for the plain baseline)."""
    return {k: tf.concat([a[k], b[k]], axis=1) for k in a if k in b}


class MetaLearner(tf.Module):
    """Wires a zoo model, an embedding collection and a communicator into train/eval steps."""

    def __init__(self, model, embedding, comm, config: MetaConfig):
        super().__init__(name="meta_learner")
        self.model = model
        self.embedding = embedding
        self.comm = comm
        self.config = config.validate()
        self.inner_lrs = {}
        if config.meta_sgd:
            self.inner_lrs = {n: tf.Variable(tf.fill(model.params[n].shape, config.inner_lr),
                                             name=f"inner_lr_{n.replace('/', '_')}")
                              for n in model.adapted_names()}
        # ridge: the penalty per coefficient of the linear task terms, log-parameterised (learned)
        self.solved = model.linear_task_terms() if config.inner_solver == "ridge" else ()
        self.ridge_log_lambda = {}
        if self.solved:
            width = model.linear_task_width()
            self.ridge_log_lambda = {"log_lambda": tf.Variable(tf.fill([width], float(np.log(config.ridge_lambda))),
                                                               name="ridge_log_lambda")}
        self.dense_variables = (list(model.params.values()) + list(self.inner_lrs.values())
                                + list(self.ridge_log_lambda.values()))
        self.optimizer = Adam(self.dense_variables, learning_rate=config.outer_lr,
                              names=[f"params/{n}" for n in model.params] + [f"inner_lr/{n}" for n in self.inner_lrs]
                              + [f"ridge/{n}" for n in self.ridge_log_lambda])
        self._train_fn = None
        self._eval_fns = {}

    # ------------------------------------------------------------------ state
    def state_variables(self) -> dict:
        """Every replicated variable that defines this learner, by name: the model's state, the
        Meta-SGD rates and the outer optimizer's slots (identical on every rank)."""
        state = dict(self.model.state_variables())
        state.update({f"inner_lr/{n}": v for n, v in self.inner_lrs.items()})
        state.update({f"ridge/{n}": v for n, v in self.ridge_log_lambda.items()})
        state.update({f"outer_optimizer/{k}": v for k, v in self.optimizer.state_variables().items()})
        return state

    # ------------------------------------------------------------------ building blocks
    def embed(self, batch):
        """One lookup for support and query together -> model inputs ([T,S,W], [T,Q,W])."""
        support, query = batch["support"], batch["query"]
        s_len = support["mask"].shape[1]
        ids = {f: tf.concat([support[f], query[f]], axis=1) for f in self.model.sparse_features}
        vectors = self.embedding.lookup(ids)
        # tf.split, not two slices: a slice's gradient fills a zero tensor of the whole input
        # (StridedSliceGrad, 15% of a MeLU step's op time); the split's is one concat
        parts = {f: tf.split(v, [s_len, v.shape[1] - s_len], axis=1) for f, v in vectors.items()}
        x_support = self.model.build_inputs({f: p[0] for f, p in parts.items()}, support)
        x_query = self.model.build_inputs({f: p[1] for f, p in parts.items()}, query)
        return x_support, x_query

    def params(self) -> dict:
        return {n: v.read_value() if isinstance(v, tf.Variable) else v
                for n, v in self.model.params.items()}

    def adaptation_variables(self) -> list:
        """The learned settings of the inner loop itself (Meta-SGD rates, ridge penalties)."""
        return list(self.inner_lrs.values()) + list(self.ridge_log_lambda.values())

    def adapt(self, params: dict, x, part, steps: int, first_order: bool) -> dict:
        """Inner loop: returns params with the adapted entries replaced by fast weights [T, ...]:
        per step, from one forward pass at the current fast weights, a gradient step of the
        stepped terms and the closed-form step of the solved ones (both from the same point)."""
        return self.adapt_from_start(params, x, part, steps, first_order)[0]

    def adapt_from_start(self, params: dict, x, part, steps: int, first_order: bool) -> tuple:
        """``(adapt's result, the model's outputs on x at the shared values)``: the inner loop's
        first forward pass starts at the shared values, so it is also the plain model's pass on
        these rows (None without inner steps)."""
        n_tasks = tf.shape(x)[0]
        fast = {n: tf.tile(params[n][None], tf.concat([[n_tasks], tf.ones_like(tf.shape(params[n]))], 0))
                for n in self.model.adapted_names()}
        stepped = self.model.stepped_task_terms(self.solved)
        start = None
        for step in range(steps):
            outputs, update = None, {}
            if stepped:
                outputs, update = self._gradient_step(params, fast, stepped, x, part, first_order)
            else:
                outputs = self.model.forward({**params, **fast}, x)
            if self.solved:
                update.update(self._ridge_step(params, fast, x, part, first_order, outputs))
            start = outputs if step == 0 else start
            fast.update(update)
        return {**params, **fast}, start

    def _gradient_step(self, params, fast, names, x, part, first_order) -> tuple:
        """``(outputs at the current fast weights, the stepped terms after one gradient step)``."""
        with tf.GradientTape() as tape:
            tape.watch([fast[n] for n in names])
            outputs = self.model.forward({**params, **fast}, x)
            # tasks are independent, so d(sum of task losses)/d(fast_t) is task t's gradient
            total = tf.reduce_sum(self.model.task_loss(outputs, part))
        grads = tape.gradient(total, {n: fast[n] for n in names})
        grads = {n: grads[n] if grads[n] is not None else tf.zeros_like(fast[n]) for n in names}
        if self.config.inner_clip > 0:
            grads = _clip_per_task(grads, self.config.inner_clip)
        out = {}
        for n in names:
            g = tf.stop_gradient(grads[n]) if first_order else grads[n]
            out[n] = fast[n] - self.inner_lrs.get(n, self.config.inner_lr) * g
        return outputs, out

    def _ridge_step(self, params, fast, x, part, first_order, outputs=None) -> dict:
        """One Newton step on each task's summed support loss + (lambda / 2) ||theta - theta_0||^2
        in the linear task coefficients theta (theta_0: their shared values):
        ``theta -= (D'WD + diag(lambda))^-1 (D'g + lambda (theta - theta_0))``, with ``D`` the
        design (d output / d theta, exact: the output is linear in theta), ``g`` and ``W`` the
        loss's first and second derivative in each row's output (W clipped at 0). For a squared
        loss the first step lands on the penalised optimum and further steps stay there."""
        model = self.model
        p = {**params, **fast}
        out = model.forward(p, x) if outputs is None else outputs      # (the gradient step's, if any)
        derivatives = model.output_derivatives(out, part)
        if derivatives is None:
            derivatives = self._output_derivatives(p, x, part)
        g, w = derivatives
        w = tf.maximum(w, 0.0)
        design = model.task_design(p, x)                                 # [T, N, K]
        n_tasks = tf.shape(design)[0]
        theta = model.linear_task_values(fast, n_tasks)                  # [T, K]
        theta0 = model.linear_task_values(params, n_tasks)
        lam = tf.exp(self.ridge_log_lambda["log_lambda"])                # [K]
        hessian = tf.linalg.matmul(design, design * w[..., None], transpose_a=True) + tf.linalg.diag(lam)
        grad = tf.linalg.matmul(design, g[..., None], transpose_a=True)[..., 0] + lam * (theta - theta0)
        delta = -spd_solve(hessian, grad[..., None])[..., 0]
        if first_order:
            delta = tf.stop_gradient(delta)
        return model.with_linear_task_values(fast, theta + delta)

    def _output_derivatives(self, p, x, part):
        """``(g, w)`` of each task's summed support loss in the task output, by nested tapes (the
        loss is separable over rows, so the second derivative is the diagonal one)."""
        rows = tf.reduce_sum(part["mask"], axis=1)                       # [T]: mean -> sum loss
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                out = self.model.forward(p, x)
                output = out[self.model.task_output]
                outer.watch(output)
                inner.watch(output)
                total = tf.reduce_sum(self.model.task_loss(out, part) * rows)
            g = inner.gradient(total, output)                            # [T, N]
        return g, outer.gradient(g, output)

    def adapt_task_loop(self, params, x, part, steps, first_order):
        """DMAML-style baseline: the same inner loop, one task at a time (unrolled in the graph)."""
        n_tasks = x.shape[0]
        per_task = []
        for t in range(n_tasks):
            sub = {k: v[t:t + 1] for k, v in part.items()}
            per_task.append(self.adapt(params, x[t:t + 1], sub, steps, first_order))
        return {n: (tf.concat([p[n] for p in per_task], 0) if n in self.model.adapted_names()
                    else params[n]) for n in params}

    def _adapted(self, params, x, part, steps, first_order) -> tuple:
        """``(adapted params, outputs at the shared values or None)``, vectorized or task by task."""
        if self.config.task_loop:
            return self.adapt_task_loop(params, x, part, steps, first_order), None
        return self.adapt_from_start(params, x, part, steps, first_order)

    def _plain_loss(self, params, x_support, x_query, batch, support_outputs):
        """Per task, the plain model's mean loss over its support and query rows; the support
        rows' pass is the inner loop's first (``support_outputs``) when there is one."""
        support, query = batch["support"], batch["query"]
        if support_outputs is None:
            part = _concat_parts(support, query)
            return self.model.task_loss(self.model.forward(params, tf.concat([x_support, x_query], axis=1)), part)
        rows_s = tf.reduce_sum(support["mask"], axis=1)
        rows_q = tf.reduce_sum(query["mask"], axis=1)
        total = (self.model.task_loss(support_outputs, support) * rows_s
                 + self.model.task_loss(self.model.forward(params, x_query), query) * rows_q)
        return total / tf.maximum(rows_s + rows_q, 1.0)

    # ------------------------------------------------------------------ one meta-step
    def meta_loss_sum(self, batch):
        """Steps 1-3: lookup, inner loop, query loss. Returns (sum of losses, count) over this
        rank's real tasks (rows for ``meta="none"``), so the step can normalise globally."""
        cfg = self.config
        task_mask = batch["task_mask"]
        # (the name scopes label each stage's ops in profiles: gmeta bench breakdown)
        # 1. embeddings of support and query: one lookup, one AlltoAll round trip
        with tf.name_scope("lookup"):
            x_support, x_query = self.embed(batch)
        params = self.params()
        if cfg.meta == "maml":
            # 2. inner loop on the support sets, all tasks at once
            with tf.name_scope("inner_loop"):
                fast, start = self._adapted(params, x_support, batch["support"], cfg.inner_steps, cfg.first_order)
            # 3. query loss with the adapted weights; a task without query rows has no loss and
            #    does not count
            with tf.name_scope("query_loss"):
                per_task = self.model.task_loss(self.model.forward(fast, x_query), batch["query"])
                if cfg.plain_weight > 0:
                    # the shared parameters also learn from every row, as a plain model would:
                    # MAML's query-only objective otherwise sees a fraction of the labels
                    per_task += cfg.plain_weight * self._plain_loss(params, x_support, x_query, batch, start)
                counted = task_mask * tf.cast(tf.reduce_sum(batch["query"]["mask"], axis=1) > 0, tf.float32)
                return tf.reduce_sum(per_task * counted), tf.reduce_sum(counted)
        # non-meta baseline: the same network on all rows, one plain step
        part = _concat_parts(batch["support"], batch["query"])
        part["mask"] = part["mask"] * task_mask[:, None]
        x = tf.concat([x_support, x_query], axis=1)
        per_task = self.model.task_loss(self.model.forward(params, x), part)
        rows = tf.reduce_sum(part["mask"], axis=1)
        return tf.reduce_sum(per_task * rows), tf.reduce_sum(rows)

    def meta_loss(self, batch):
        """This rank's mean loss (single-process view; used by tests and diagnostics)."""
        total, count = self.meta_loss_sum(batch)
        return total / tf.maximum(count, 1.0)

    def train_step(self, batch):
        """One meta-step (see the module docstring for the five stages). Returns global sums:
        ``{"loss": mean query loss, "tasks": real tasks, "stop": ranks asking to stop}``."""
        with tf.GradientTape() as tape:
            loss_sum, count = self.meta_loss_sum(batch)
        # 4. meta-gradients (second order unless first_order) of this rank's SUM of losses
        n_dense = len(self.dense_variables)
        grads = tape.gradient(loss_sum, self.dense_variables + list(self.embedding.trainable_variables))
        dense_grads = [g if g is not None else tf.zeros_like(v)
                       for g, v in zip(grads[:n_dense], self.dense_variables)]
        emb_grads = grads[n_dense:]
        # 5. ONE fused allreduce, one division by the global count (the rule of comm.py); the
        #    loss rides along, so every rank reports (and guards on) the same global mean, as do
        #    the step's real tasks (for tasks/s) and any rank's request to stop (comm.StopRequest)
        with tf.name_scope("allreduce"):
            emb_inputs = self.embedding.reduction_inputs(emb_grads)
            sums, scale, (tasks, stop) = self.comm.sum_for_global_mean(
                dense_grads + emb_inputs + [loss_sum], count,
                riders=[tf.reduce_sum(batch["task_mask"]), self.comm.stop.flag.read_value()])
        with tf.name_scope("optimizer"):
            dense_step = [g * scale for g in sums[:n_dense]]
            if self.config.clip_norm > 0:
                dense_step, _ = tf.clip_by_global_norm(dense_step, self.config.clip_norm)
            self.optimizer.apply(dense_step)
            self.embedding.apply_reduced(emb_grads, sums[n_dense:-1], scale)
        return {"loss": sums[-1] * scale, "tasks": tasks, "stop": stop}

    # ------------------------------------------------------------------ evaluation
    def eval_step(self, batch, steps: int):
        """Query scores before and after adapting on the support set (no parameter update),
        with what per-task metrics need per query row: the task, the item and the raw rating."""
        x_support, x_query = self.embed(batch)
        params = self.params()
        query = batch["query"]
        mask = query["mask"] * batch["task_mask"][:, None]
        before = self.model.scores(self.model.forward(params, x_query), query)
        fast = self.adapt(params, x_support, batch["support"], steps, first_order=True)
        after = self.model.scores(self.model.forward(fast, x_query), query)
        out = {"mask": mask, "task": tf.broadcast_to(batch["task_id"][:, None], tf.shape(mask))}
        item = self.model.schema.item_id_feature
        if item is not None and not self.model.schema.feature(item).is_list:
            out["item"] = query[item]
        if "rating" in query:
            out["rating"] = query["rating"]
        for name, (score, label) in before.items():
            out[score_key(name, "unadapted")] = score
            out[score_key(name, "adapted")] = after[name][0]
            out[label_key(name)] = label
        return out

    def compiled_train_step(self, element_spec):
        """The traced step. Without autograph: the step's Python control flow is over static
        values only (steps, names), and converting it cost 7 s of a 12 s first epoch."""
        if self._train_fn is None:
            self._train_fn = tf.function(self.train_step, input_signature=[element_spec], autograph=False)
        return self._train_fn

    def compiled_eval_step(self, element_spec, steps: int):
        """One traced eval function per number of adaptation steps, batch shape (splits may differ
        in support/query caps) and model switch (``plain_state``, e.g. MetaEmb's generate_for, is
        Python fixed at trace time: a trace from before a phase must not serve after it)."""
        key = (steps, tuple((tuple(s.shape), s.dtype.name) for s in tf.nest.flatten(element_spec)),
               tuple(sorted(self.model.plain_state().items())))
        if key not in self._eval_fns:
            self._eval_fns[key] = tf.function(lambda b: self.eval_step(b, steps),
                                              input_signature=[element_spec], autograph=False)
        return self._eval_fns[key]
