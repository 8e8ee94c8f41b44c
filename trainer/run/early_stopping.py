"""Early stopping on the validation split: the best epoch's weights are the run's model.

On small real data the validation GAUC can peak after a few epochs and fall while the training
loss still drops (per-item embeddings memorise a few hundred users' labels); the epoch count
that suits one dataset is wrong for the next. So after every epoch the validation report
(identical on every rank: the evaluation gathers every rank's rows) scores each learner, the best
epoch's model variables are kept in host memory (this rank's replicated variables and its own
table shards, no optimizer slots), training stops once no learner improved for ``patience``
epochs, and the best weights are put back before the extra phases, the evaluation and the export.
The model is scored by its adapted validation GAUC, the plain network trained alongside by its
own unadapted one, so both baselines get the same selection. (The untrained model is not a
candidate: its adapted scores come from random item embeddings; measured, offering it cost MeLU
0.013 GAUC in the synthetic few-shot regime and changed explicit MovieLens by +0.002.)
"""

from __future__ import annotations

import math

import numpy as np

from gmeta.trainer.meta.state import run_state


class BestEpoch:
    """The best epoch so far of one learner, and its weights."""

    def __init__(self, learner, name: str):
        self.learner, self.name = learner, name
        self.epoch, self.score, self.values = None, -math.inf, None

    def _variables(self) -> dict:
        state = run_state(self.learner)
        tables = {f"table/{t.name}" for t in self.learner.embedding.plan.tables}
        return {**state.model_variables(), **{n: v for n, v in state.sharded.items() if n in tables}}

    def offer(self, epoch: int, score) -> bool:
        """Keep this epoch's weights if ``score`` beats the best so far; True when it did."""
        if score is None or not math.isfinite(score) or score <= self.score:
            return False
        self.epoch, self.score = epoch, float(score)
        self.values = {n: np.array(v.numpy(), copy=True) for n, v in self._variables().items()}
        return True

    def restore(self) -> None:
        """Put the best epoch's weights back (every rank its own shards)."""
        if self.values is None:
            return
        for name, var in self._variables().items():
            var.assign(self.values[name])
        self.learner.embedding.after_load()


class EarlyStopping:
    """``offer`` after each epoch, ``restore`` at the end (see the module docstring)."""

    def __init__(self, learner, plain, patience: int, log):
        self.best = [BestEpoch(learner, "model")] + ([BestEpoch(plain, "plain network")] if plain else [])
        self.patience, self.log = int(patience), log
        self.since_best = 0

    def offer(self, epoch: int, report: dict) -> bool:
        """Score this epoch; True when training should stop (no learner improved for
        ``patience`` epochs)."""
        head = next(h for h, sec in report.items() if isinstance(sec, dict) and isinstance(sec.get("adapted"), dict))
        scores = [report[head]["adapted"]["gauc"]["value"],
                  report[head].get("plain", {}).get("gauc", {}).get("value")]
        improved = [b.offer(epoch, s) for b, s in zip(self.best, scores)]
        self.since_best = 0 if any(improved) else self.since_best + 1
        if self.patience and self.since_best >= self.patience:
            self.log(f"early stopping after epoch {epoch}: no validation GAUC improved for {self.patience} epochs")
            return True
        return False

    def restore(self) -> dict:
        """Every learner back at its best epoch; returns ``{name: best epoch}`` for the record."""
        out = {}
        for b in self.best:
            if b.values is not None:
                b.restore()
                out[b.name] = b.epoch
                self.log(f"{b.name}: the weights of epoch {b.epoch} (validation GAUC {b.score:.4f}) are the "
                         f"run's model")
        return out
