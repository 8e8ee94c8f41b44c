"""The training loop takes its batches from a thread that fetched them ahead: the same batches in
the same order, an error raised where it happened, and nothing left running after ``close``."""

import threading
import time

import pytest

from gmeta.trainer.run.ahead import BatchesAhead


def test_same_batches_same_order_then_the_end():
    ahead = BatchesAhead(iter(range(50)), depth=3)
    assert list(ahead) == list(range(50))
    with pytest.raises(StopIteration):
        next(ahead)
    ahead.close()


def test_an_error_is_raised_on_the_training_thread_at_its_batch():
    def batches():
        yield 1
        yield 2
        raise ValueError("stripe 3 is corrupt")

    ahead = BatchesAhead(batches())
    assert next(ahead) == 1 and next(ahead) == 2
    with pytest.raises(ValueError, match="stripe 3 is corrupt"):
        next(ahead)
    ahead.close()


def test_close_stops_a_thread_waiting_on_a_full_queue():
    ahead = BatchesAhead(iter(range(10**6)), depth=2)
    assert next(ahead) == 0
    time.sleep(0.2)  # the thread fills the queue and waits
    ahead.close()
    assert not any(t.name == "gmeta-batches-ahead" and t.is_alive() for t in threading.enumerate())
