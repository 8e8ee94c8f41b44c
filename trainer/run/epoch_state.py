"""Where a training run is: what a checkpoint saves and a resumed run starts from.

The position (epoch, steps done in it, global step), the loss history the guards read, and the
current epoch's running loss sums. A resumed run starts from a checkpoint's ``resume_point`` and
continues with the first batch not yet trained; its history and the interrupted epoch's sums are
the interrupted run's, so its numbers are the uninterrupted run's.
"""

from __future__ import annotations


class EpochState:
    """The run's position, loss history and running sums (see module docstring)."""

    def __init__(self, steps_per_epoch: int, plain: bool, resume_point: dict | None = None):
        self.steps = steps_per_epoch
        self.plain = plain
        if resume_point is not None:
            position = resume_point["position"]
            self.first_epoch, self.first_step = position["epoch"], position["step_in_epoch"]
            self.global_step = position["global_step"]
            self.history = {k: (list(v) if isinstance(v, list) else v) for k, v in resume_point["history"].items()}
            self._resumed_sums = dict(resume_point["epoch_sums"])
        else:
            self.first_epoch, self.first_step, self.global_step = 0, 0, 0
            self.history = {"loss": [], "plain_loss": []} if plain else {"loss": []}
            self._resumed_sums = {"loss": 0.0, "plain_loss": 0.0}
        self.epoch = self.first_epoch
        self.n, self.loss_sum, self.plain_sum = 0, 0.0, 0.0

    def begin_epoch(self, epoch: int) -> None:
        """Start ``epoch``: the interrupted epoch of a resumed run continues its sums."""
        self.epoch = epoch
        if epoch == self.first_epoch and self.first_step:
            self.loss_sum, self.plain_sum, self.n = (self._resumed_sums["loss"], self._resumed_sums["plain_loss"],
                                                     self.first_step)
        else:
            self.loss_sum, self.plain_sum, self.n = 0.0, 0.0, 0

    @property
    def epoch_done(self) -> bool:
        return self.n >= self.steps

    def add_step(self, loss: float, plain_loss: float | None) -> None:
        """Count one trained step of this epoch (``global_step`` already counts it)."""
        if plain_loss is not None:
            self.plain_sum += plain_loss
        if self.global_step == 1:
            self.history["first_step_loss"] = loss  # the untrained model's loss: a reference
        self.loss_sum += loss
        self.n += 1

    def epoch_means(self) -> tuple:
        """(mean loss, the plain network's mean loss or None) of this epoch."""
        mean = self.loss_sum / max(self.n, 1)
        return mean, (self.plain_sum / max(self.n, 1) if self.plain else None)

    def snapshot(self) -> dict:
        """What a checkpoint saves of the run's progress (after an epoch's last step: the next
        epoch's start)."""
        done = self.epoch_done
        return {"position": {"epoch": self.epoch + 1 if done else self.epoch, "step_in_epoch": 0 if done else self.n,
                             "global_step": self.global_step, "steps_per_epoch": self.steps},
                "history": self.history,
                "epoch_sums": {"loss": 0.0 if done else self.loss_sum, "plain_loss": 0.0 if done else self.plain_sum}}
