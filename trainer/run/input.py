"""The training batches of a rank, for either input sharding."""

from __future__ import annotations

from gmeta.io.reader import MetaReader
from gmeta.trainer.config import resolve_sizes


class TrainInput:
    """The training batches of this rank.

    ``units``: each rank reads its own range of the split's tasks; the global batch of a step is
    whatever the ranks' shuffles put together, so results vary with the number of workers the
    way any data order does. ``replicated``: every rank reads the whole split as one reader with
    ``T x N`` tasks per batch and keeps rows ``[rank*T, (rank+1)*T)``; the global batch sequence
    is then identical for any N, which makes N-worker training reproduce 1-worker training.
    """

    def __init__(self, cfg, comm):
        kwargs = resolve_sizes(cfg, lambda message: None).reader_kwargs()
        self.slice = None
        if cfg.input_sharding == "replicated" and comm.size > 1:
            kwargs["tasks_per_batch"] *= comm.size
            self.reader = MetaReader(cfg.data, split="train", rank=0, world_size=1, shuffle=True,
                                     seed=cfg.seed, **kwargs)
            self.slice = (comm.rank * cfg.tasks_per_batch, (comm.rank + 1) * cfg.tasks_per_batch)
        else:
            self.reader = MetaReader(cfg.data, split="train", rank=comm.rank, world_size=comm.size,
                                     shuffle=True, seed=cfg.seed, **kwargs)
        self.steps_per_epoch = self.reader.steps_per_epoch
        self.stats = self.reader.stats

    @property
    def error(self):
        """The DataError the reader met, if any (raised in place of tf.data's error)."""
        return self.reader.error

    def epoch_stats(self, epoch: int) -> dict:
        return self.reader.epoch_stats(epoch)

    def dataset(self, epoch: int, packed: bool = False, epochs: int = 1):
        """This rank's batches of ``epochs`` epochs from ``epoch`` on; ``packed``: as the reader's
        packed batches (``unpack`` turns one into the interface dict inside a traced step)."""
        ds = self.reader.dataset(epoch=epoch, packed=packed, epochs=epochs)
        if self.slice is None:
            return ds
        lo, hi = self.slice
        return ds.map(lambda b: self.reader.slice_tasks(b, lo, hi))

    def unpack(self, batch):
        return self.reader.unpack(batch)
