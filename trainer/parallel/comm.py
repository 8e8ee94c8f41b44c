"""The communicator: the only module in gmeta that imports Horovod.

Everything else takes a ``Communicator`` (rank, size and a handful of collectives), so the
single-process path (``LocalCommunicator``, no horovodrun) runs exactly the same code.

Gradient scaling: one rule, written down once
---------------------------------------------
Every rank contributes SUMS, never means, and there is one division, by the global count of
what the loss averages over (real tasks with at least one query row for MAML; real rows for the
plain baseline). ``sum_for_global_mean`` is that rule: ONE fused ``grouped_allreduce`` (Sum)
carries every tensor that must be summed over ranks (the dense gradients, and for the
replicated embedding baseline its dense table gradients and row-touched counts) plus this
rank's count, and returns the sums and ``1 / global count``. Then:

* dense (replicated) parameters step with ``sum * scale``;
* sharded embedding rows already hold the sum over ranks when they come home through the
  AlltoAll backward pass (each rank sends the gradient of its own loss sum), so the embedding
  multiplies them by the same ``scale`` before its row-wise optimizer;
* the replicated baseline's table gradients are summed in the same collective and scaled alike.

So every parameter steps along the gradient of the exact global mean, whatever the number of
ranks and however unevenly real tasks are spread over them. The meta-learner's step and the
extra training phases (MetaEmb's generator) use this function and nothing else rescales.

Collective safety: every rank must issue the same collectives in the same order. All
collectives here are issued from code paths that do not depend on rank-local data sizes;
ranks with nothing to send still call ``alltoall`` with zero splits.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Sequence

import tensorflow as tf

from gmeta.trainer.parallel.launch import launched_by_horovodrun

# Counter kinds reported as metrics (bytes and calls per step).
COUNTER_KINDS = ("alltoall_ids", "alltoall_vectors", "alltoall_grads", "allreduce", "broadcast", "hot_sync")


class CommCounters(tf.Module):
    """Bytes and calls per collective kind, kept as variables so traced steps update them."""

    def __init__(self):
        super().__init__(name="comm_counters")
        self.bytes = {k: tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{k}_bytes")
                      for k in COUNTER_KINDS}
        self.calls = {k: tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{k}_calls")
                      for k in COUNTER_KINDS}

    def add(self, kind: str, tensors) -> None:
        if kind not in self.bytes:
            raise ValueError(f"unknown collective kind {kind!r}; expected one of {COUNTER_KINDS}")
        tensors = tf.nest.flatten(tensors, expand_composites=False)
        total = tf.constant(0, tf.int64)
        for t in tensors:
            if isinstance(t, tf.IndexedSlices):  # only the values travel
                t = t.values
            total += tf.cast(tf.size(t, out_type=tf.int64), tf.int64) * t.dtype.size
        self.bytes[kind].assign_add(total)
        self.calls[kind].assign_add(1)

    def snapshot(self) -> dict:
        """Plain-Python copy of every counter: ``{kind: {"bytes": int, "calls": int}}``."""
        return {k: {"bytes": int(self.bytes[k].numpy()), "calls": int(self.calls[k].numpy())}
                for k in COUNTER_KINDS}

    def delta(self, before: dict) -> dict:
        """Counters accumulated since ``before`` (a ``snapshot()``), same layout as snapshot."""
        now = self.snapshot()
        return {k: {f: now[k][f] - before.get(k, {}).get(f, 0) for f in ("bytes", "calls")}
                for k in COUNTER_KINDS}

    def reset(self) -> None:
        for v in list(self.bytes.values()) + list(self.calls.values()):
            v.assign(0)


class StopRequest(tf.Module):
    """A rank's request to stop the job cleanly (SIGTERM/SIGINT from a scheduler or a user).

    A signal can reach one rank or all of them, at any moment. The handler only notes it
    (``note``); before its next step the rank raises ``flag`` (``arm``), which rides in that
    step's one allreduce (``sum_for_global_mean(riders=...)``), so every rank learns of it at
    the same step, with no extra collective, and they all stop after that step together.
    """

    def __init__(self):
        super().__init__(name="stop_request")
        self.flag = tf.Variable(0.0, trainable=False, name="flag")
        self.signal = None  # the signal number noted on this rank, if any

    def note(self, signum: int) -> None:
        self.signal = self.signal or signum

    def arm(self) -> None:
        if self.signal is not None and float(self.flag.numpy()) == 0.0:
            self.flag.assign(1.0)


@dataclass
class Communicator:
    """Base class: rank/size plus the collectives gmeta uses. Subclasses implement ``_*`` hooks."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        self.counters = CommCounters()
        self.stop = StopRequest()  # shared with with_own_counters() twins

    def with_own_counters(self) -> "Communicator":
        """The same communicator (same ranks, same collectives) counting into fresh counters,
        so a second model trained in the same run (the plain baseline) is reported apart."""
        twin = copy.copy(self)
        twin.counters = CommCounters()
        return twin

    # ---- the scaling rule (see module docstring) ----
    def sum_for_global_mean(self, sums: Sequence[tf.Tensor], count: tf.Tensor, riders: Sequence[tf.Tensor] = ()):
        """``(sums over ranks, 1 / global count, riders summed over ranks)`` in ONE fused
        allreduce (see module docstring).

        ``count`` is this rank's float32 count of what the loss averages over; a global count of
        0 (no rank had anything real) gives scale 1 on zero sums, never a division by zero.
        ``riders``: float32 scalars that need a global sum too (the step's real tasks, the stop
        request), carried in the same collective.
        """
        n = len(sums)
        reduced = self.allreduce_sum(list(sums) + [tf.cast(count, tf.float32)]
                                     + [tf.cast(r, tf.float32) for r in riders])
        return reduced[:n], 1.0 / tf.maximum(reduced[n], 1.0), reduced[n + 1:]

    # ---- collectives, counted ----
    def allreduce_mean(self, tensors: Sequence[tf.Tensor], kind: str = "allreduce") -> list:
        """Average a list of dense tensors over ranks in ONE fused collective."""
        return self._reduce(tensors, kind, average=True)

    def allreduce_sum(self, tensors: Sequence[tf.Tensor], kind: str = "allreduce") -> list:
        """Sum a list of dense tensors over ranks in ONE fused collective."""
        return self._reduce(tensors, kind, average=False)

    def _reduce(self, tensors, kind: str, average: bool) -> list:
        tensors = list(tensors)
        if not tensors:
            return []
        self.counters.add(kind, tensors)
        return self._grouped_allreduce(tensors, average=average)

    def alltoall(self, tensor: tf.Tensor, splits: tf.Tensor, kind: str):
        """Send ``tensor`` rows ``splits[i]`` to rank i; returns (received, received_splits).

        The backward pass of the data (not the splits) is an alltoall in the reverse direction,
        counted as ``alltoall_grads``.
        """
        splits = tf.cast(splits, tf.int32)
        self.counters.add(kind, [tensor])
        if self.size == 1:
            return _identity_with_grad_count(tensor, self.counters), splits
        return self._alltoall(tensor, splits)

    def allgather(self, tensor: tf.Tensor, kind: str) -> tf.Tensor:
        """Every rank's ``tensor`` (first dimensions may differ) concatenated in rank order; no
        gradient (used after the tape, e.g. the tiered embedding's sparse sync)."""
        self.counters.add(kind, [tensor])
        if self.size == 1:
            return tf.identity(tensor)
        return self._allgather(tensor)

    def broadcast_variables(self, variables, root_rank: int = 0) -> None:
        variables = list(variables)
        if not variables:
            return
        self.counters.add("broadcast", [v.value() for v in variables])
        self._broadcast_variables(variables, root_rank)

    def allgather_object(self, obj):
        """Gather a small picklable object from every rank (outside the hot path only)."""
        return [obj]

    def barrier(self) -> None:
        pass

    # ---- hooks ----
    def _grouped_allreduce(self, tensors, average):
        return [tf.identity(t) for t in tensors]

    def _alltoall(self, tensor, splits):
        raise NotImplementedError

    def _allgather(self, tensor):
        raise NotImplementedError

    def _broadcast_variables(self, variables, root_rank):
        pass

    def shutdown(self) -> None:
        pass

    # ---- elastic jobs (horovodrun --min-np/--max-np/--host-discovery-script) ----
    elastic = False

    def check_membership(self) -> None:
        """Elastic jobs: raise ``MembershipChanged`` on every rank when the driver announced added
        or removed hosts (a collective: every rank calls it at the same point). Otherwise nothing."""

    def rejoin(self) -> "Communicator":
        raise RuntimeError("only a communicator of an elastic Horovod job can rejoin")


class MembershipChanged(Exception):
    """Hosts were added to or removed from an elastic job: every rank raises it at the same step,
    then all of them leave the current world and rejoin the next (``Communicator.rejoin``)."""


def elastic_launch() -> bool:
    """True in a worker of an elastic horovodrun job (``--min-np``/``--max-np``/
    ``--host-discovery-script``: horovodrun then sets HOROVOD_ELASTIC=1 in every worker)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def elastic_recoverable(exc: BaseException) -> bool:
    """A failure an elastic job survives by forming a new world: a membership change, Horovod's own
    recoverable errors, or a collective (in eager code or inside a tf.function: a TensorFlow error
    from a Horovod op, or Horovod's shutdown after a peer vanished or Gloo timed out)."""
    if isinstance(exc, MembershipChanged):
        return True
    try:
        from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt
    except ImportError:
        return False
    if isinstance(exc, (HorovodInternalError, HostsUpdatedInterrupt)):
        return True
    text = str(exc)
    return isinstance(exc, (tf.errors.OpError, RuntimeError, ValueError)) and (
        "Horovod has been shut down" in text or "gloo" in text.lower()
        or (isinstance(exc, tf.errors.OpError) and "Horovod" in text))


def _identity_with_grad_count(tensor, counters):
    @tf.custom_gradient
    def ident(x):
        def grad(dy):
            if isinstance(dy, tf.IndexedSlices):  # the reverse alltoall needs a dense tensor
                dy = tf.convert_to_tensor(dy)
            counters.add("alltoall_grads", [dy])
            return tf.identity(dy)
        return tf.identity(x), grad
    return ident(tensor)


class LocalCommunicator(Communicator):
    """Single process, no Horovod: collectives are identities (size 1)."""

    def __init__(self):
        super().__init__(rank=0, size=1, local_rank=0)


class HorovodCommunicator(Communicator):
    """Horovod (Gloo on CPU, NCCL on GPU hosts) behind the Communicator interface.

    ``one_gpu_per_process``: this process sees only GPU ``local_rank`` (``pin_gpu``), set between
    ``hvd.init()`` (which tells the local rank) and the communicator's first variables (after
    which TensorFlow's devices are fixed). SOK needs it: one process per GPU.
    """

    def __init__(self, one_gpu_per_process: bool = False, elastic: bool = False, _listener=None):
        import horovod.tensorflow as hvd  # the only Horovod import in gmeta

        hvd.init()  # (elastic: blocks in the driver's rendezvous until the world is formed)
        if one_gpu_per_process:
            pin_gpu(hvd.local_rank())
        self._hvd = hvd
        self._one_gpu = one_gpu_per_process
        self.elastic = elastic
        self._listener = _listener if _listener is not None or not elastic else _hosts_listener(hvd)
        super().__init__(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank())

    def _grouped_allreduce(self, tensors, average):
        op = self._hvd.Average if average else self._hvd.Sum
        return list(self._hvd.grouped_allreduce(tensors, op=op))

    def _alltoall(self, tensor, splits):
        # Horovod registers the alltoall gradient (the reverse alltoall); we only count it.
        received, recv_splits = self._hvd.alltoall(tensor, splits=splits)
        return _identity_with_grad_count(received, self.counters), recv_splits

    def _allgather(self, tensor):
        return self._hvd.allgather(tensor)

    def _broadcast_variables(self, variables, root_rank):
        self._hvd.broadcast_variables(variables, root_rank=root_rank)

    def allgather_object(self, obj):
        return list(self._hvd.allgather_object(obj))

    def barrier(self) -> None:
        self._hvd.allreduce(tf.constant(0.0), op=self._hvd.Sum, name="gmeta_barrier")

    def shutdown(self) -> None:
        self._hvd.shutdown()

    def check_membership(self) -> None:
        if self._listener is None:
            return
        from horovod.common.exceptions import HostsUpdatedInterrupt

        try:
            self._listener.check_host_updates()  # one broadcast of rank 0's view of the driver's news
        except HostsUpdatedInterrupt as exc:
            raise MembershipChanged("hosts were " + ("removed from" if exc.skip_sync else "added to")
                                    + " the job") from None

    def rejoin(self) -> "HorovodCommunicator":
        """Leave this world and join the next one the elastic driver forms (what Horovod's own
        ``hvd.elastic.run`` does between attempts): a new communicator, with this job's rank and
        size in it, fresh counters and the same stop request (a signal noted stays noted)."""
        self._hvd.shutdown()
        self._listener.on_reset()  # news the reset has answered are dropped
        twin = HorovodCommunicator(self._one_gpu, elastic=True, _listener=self._listener)
        twin.stop = self.stop
        return twin


def _hosts_listener(hvd):
    """The worker's ear for the elastic driver: it notifies rank 0 when hosts come or go, and
    ``check_host_updates`` broadcasts rank 0's news so every rank decides alike."""
    from horovod.common.elastic import State, notification_manager

    class HostsListener(State):
        def __init__(self):
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)

        def save(self):  # gmeta's state lives in checkpoints, not in Horovod's in-memory copies
            pass

        def restore(self):
            pass

        def sync(self):
            pass

    listener = HostsListener()
    notification_manager.init()
    notification_manager.register_listener(listener)
    return listener


def pin_gpu(local_rank: int) -> None:
    """Make only GPU ``local_rank`` visible to this process (call before any TF op runs)."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[local_rank % len(gpus)], "GPU")


def horovod_version() -> str | None:
    """Horovod's version, or None when it is not installed (for a run's tags)."""
    try:
        import horovod
    except ImportError:
        return None
    return horovod.__version__


def horovod_build_info() -> dict:
    """Horovod version and build capabilities (for ``gmeta env``); never raises."""
    try:
        import horovod
        import horovod.tensorflow as hvd
    except Exception as exc:  # noqa: BLE001 - report, do not crash `gmeta env`
        return {"installed": False, "error": f"{type(exc).__name__}: {exc}"}
    info = {"installed": True, "version": horovod.__version__}
    for name in ("gloo_built", "mpi_built", "nccl_built", "ddl_built", "ccl_built",
                 "cuda_built", "rocm_built"):
        fn = getattr(hvd, name, None)
        try:
            info[name] = bool(fn()) if fn else None
        except Exception:  # noqa: BLE001
            info[name] = None
    info["tensorflow_built"] = True  # importing horovod.tensorflow succeeded
    return info


def init_communicator(backend: str = "auto", one_gpu_per_process: bool = False, elastic: bool = False) -> Communicator:
    """``auto``: Horovod when launched by horovodrun, else a local single-process communicator.
    ``one_gpu_per_process``: see ``HorovodCommunicator`` (call before TensorFlow creates a tensor).
    ``elastic``: a worker of an elastic job (``elastic_launch``): it listens for host changes."""
    if backend not in ("auto", "horovod", "local"):
        raise ValueError(f"--comm must be auto, horovod or local, got {backend!r}")
    if backend == "horovod" or (backend == "auto" and launched_by_horovodrun()):
        return HorovodCommunicator(one_gpu_per_process, elastic=elastic)
    return LocalCommunicator()
