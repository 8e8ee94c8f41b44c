"""Batches fetched ahead on a thread of their own, so the training loop does not pay for the
hand-off itself.

tf.data already prepares batches ahead, but taking one out of its iterator is Python work on the
training thread: the eager tensors and their structure, about 0.1 ms for a packed batch and
most of the demo's input wait (``gmeta bench io --input-wait``). Here a thread takes them out
while the step runs (a traced step releases the GIL), ``depth`` batches ahead, in the iterator's
order; an error it meets is raised on the training thread at the batch where it happened.
"""

from __future__ import annotations

import queue
import threading

_BATCH, _END, _ERROR = "batch", "end", "error"


class BatchesAhead:
    """An iterator over ``batches`` whose items a background thread has already taken out."""

    def __init__(self, batches, depth: int = 2):
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fetch, args=(batches,), name="gmeta-batches-ahead", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fetch(self, batches) -> None:
        try:
            for batch in batches:
                if not self._put((_BATCH, batch)):
                    return
            self._put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, raised there
            self._put((_ERROR, exc))

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == _BATCH:
            return value
        if kind == _END:
            self._queue.put((_END, None))  # (a later next() ends too)
            raise StopIteration
        raise value

    def close(self) -> None:
        """Stop fetching (the thread leaves within 0.1 s; batches already taken are dropped)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
