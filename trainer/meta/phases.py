"""Extra training phases a model offers after meta-training (``ZooModel.training_phases``).

MetaEmb's generator is one: the base model frozen, a small network trained on a loss the model
defines. The trainer owns everything distributed about it: the embedding lookup (one round trip,
vectors held constant), the fused allreduce with the step's scaling rule
(``comm.sum_for_global_mean``: sums of per-task losses, one division by the global count), the
optimizer, the progress log, and the facts read from the data (``needs_values``: the distinct
values of a column over the WHOLE training split, not just the rows that survived batch
capping). The model never imports the trainer.
"""

from __future__ import annotations

import tensorflow as tf

from gmeta.trainer.meta.dense_optim import Adam
from gmeta.trainer.meta.learner import batch_spec


class PhaseStep(tf.Module):
    """One step of a phase: lookup, the model's loss sum, one fused allreduce, Adam."""

    def __init__(self, phase, learner, learning_rate: float):
        super().__init__(name=f"phase_{phase.name}")
        self.phase, self.learner = phase, learner
        self.variables_ = list(phase.variables)
        self.optimizer = Adam(self.variables_, learning_rate=learning_rate,
                              names=[f"{phase.name}/{i}" for i in range(len(self.variables_))])
        self._fn = None

    def step(self, batch):
        learner = self.learner
        support, query = batch["support"], batch["query"]
        ids = {f: tf.concat([support[f], query[f]], axis=1) for f in learner.model.sparse_features}
        vectors = {f: tf.stop_gradient(v) for f, v in learner.embedding.lookup(ids).items()}
        params = {n: tf.stop_gradient(v) for n, v in learner.params().items()}
        with tf.GradientTape() as tape:
            loss_sum, count = self.phase.loss_sum(vectors, params, batch)
        grads = tape.gradient(loss_sum, self.variables_)
        grads = [g if g is not None else tf.zeros_like(v) for g, v in zip(grads, self.variables_)]
        sums, scale, _ = learner.comm.sum_for_global_mean(grads, count)
        self.optimizer.apply([g * scale for g in sums])
        return loss_sum / tf.maximum(count, 1.0)

    def compiled(self, element_spec):
        if self._fn is None:
            self._fn = tf.function(self.step, input_signature=[element_spec], autograph=False)
        return self._fn


def run_phases(learner, train_input, *, epochs: int, first_epoch: int, learning_rate: float,
               distinct_values, log, tracker) -> dict:
    """Run every phase the model offers for ``epochs`` epochs each; ``{phase: [mean loss per
    epoch]}``. Every phase's ``finish`` is called, with ``trained=False`` when it did not run.

    ``distinct_values(column) -> np.ndarray`` reads a column's distinct training values (the
    caller decides how; every rank gets the same answer). ``first_epoch`` numbers the reader's
    epochs after meta-training so phases see fresh shuffles.
    """
    history = {}
    epoch_no = first_epoch
    for phase in learner.model.training_phases():
        runs = epochs > 0 and learner.config.meta == "maml"
        losses = []
        if runs:
            step = PhaseStep(phase, learner, learning_rate)
            batches = iter(train_input.dataset(epoch=epoch_no, epochs=epochs))  # one pipeline for all
            for epoch in range(epochs):
                total, n = 0.0, train_input.steps_per_epoch
                for _ in range(n):
                    batch = next(batches)
                    total += float(step.compiled(batch_spec(batch))(batch))
                losses.append(total / max(n, 1))
                tracker.log_metrics({f"{phase.name}_loss": losses[-1]}, step=epoch)
                log(f"{learner.model.name} {phase.name} epoch {epoch}: loss {losses[-1]:.4f}")
            epoch_no += epochs
        values = {c: distinct_values(c) for c in phase.needs_values} if runs else {}
        phase.finish(runs, values)
        if runs:
            for column, v in values.items():
                log(f"{learner.model.name} {phase.name}: {v.size:,} distinct {column} values in training")
            history[phase.name] = losses
    return history
