"""`gmeta train`'s input sharding, in process: which tasks each rank's batches hold.

``--input-sharding replicated`` promises that N workers train on exactly the batches of one
worker with N x T tasks per batch (rank r keeps tasks [r*T, (r+1)*T) of each global batch), which
together with the per-step equality of tests/test_distributed.py makes an N-worker run
reproduce the 1-worker run. ``units`` promises that every task of an epoch reaches exactly one
rank once. A communicator here is any object with ``rank`` and ``size``: TrainInput issues no
collective.
"""

import types
from pathlib import Path

import numpy as np
import pyarrow.orc as orc
import pytest
import tensorflow as tf
from conftest import REPO, run_gmeta

from gmeta.trainer.config import TrainConfig
from gmeta.trainer.run.input import TrainInput

T = 7  # tasks per worker per batch; no N below divides the tasks evenly, so the last batch pads


@pytest.fixture(scope="module")
def striped(tmp_path_factory):
    """150 train tasks in 11 stripes of 3 files (uneven task counts), so ``units`` sharding has
    work for every rank and the reader's shuffle mixes stripes and files."""
    out = tmp_path_factory.mktemp("striped") / "data"
    run_gmeta("datagen", "--out", out, "--seed", "2", "--train-users", "150", "--cold-users", "0",
              "--items", "80", "--rows-per-stripe", "500", "--rows-per-file", "2500", "--quiet", cwd=REPO)
    return out


def _comm(rank: int, size: int):
    return types.SimpleNamespace(rank=rank, size=size, local_rank=rank)


def _cfg(data, sharding: str, tasks_per_batch: int = T) -> TrainConfig:
    return TrainConfig(model="maml_dnn", data=str(data), tasks_per_batch=tasks_per_batch,
                       support_size=8, query_size=4, input_sharding=sharding, seed=5)


def _epoch(inp, epoch: int = 0) -> list:
    """Every batch of one epoch as nested dicts of numpy arrays."""
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in inp.dataset(epoch=epoch)]


def _train_task_ids(data) -> np.ndarray:
    """Every task id of the train split, read from the ORC files themselves (not the reader)."""
    files = sorted(Path(data, "train").glob("*.orc"))
    assert files, f"no ORC files under {data}/train"
    return np.unique(np.concatenate([orc.read_table(f, columns=["task_id"]).column("task_id").to_numpy()
                                     for f in files]))


def _real_task_ids(batches) -> list:
    return [int(t) for b in batches for t in b["task_id"][b["task_mask"] > 0]]


@pytest.mark.parametrize("n", [2, 3])
def test_replicated_slices_concatenate_to_the_one_worker_batches(striped, n):
    """Concatenating the N ranks' batches of a step gives, tensor for tensor, the batch of a
    1-worker reader with T*N tasks per batch, for every step of the epoch."""
    one = TrainInput(_cfg(striped, "replicated", tasks_per_batch=T * n), _comm(0, 1))
    ranks = [TrainInput(_cfg(striped, "replicated"), _comm(r, n)) for r in range(n)]
    expected = _epoch(one)
    assert len(expected) == one.steps_per_epoch
    # the reference epoch covers the split once, with a padded last batch: the slices have
    # both real and padding tasks to get right
    assert sorted(_real_task_ids(expected)) == _train_task_ids(striped).tolist()
    assert expected[-1]["task_mask"].min() == 0
    per_rank = [_epoch(x) for x in ranks]
    for x, batches in zip(ranks, per_rank):
        assert x.steps_per_epoch == one.steps_per_epoch
        assert len(batches) == one.steps_per_epoch
    for step, want in enumerate(expected):
        parts = [batches[step] for batches in per_rank]
        for part in parts:  # every rank holds exactly T tasks of every tensor
            assert {leaf.shape[0] for leaf in tf.nest.flatten(part)} == {T}
        got = tf.nest.map_structure(lambda *xs: np.concatenate(xs, axis=0), *parts)
        tf.nest.assert_same_structure(got, want)
        for path, g in _leaves(got):
            w = _at(want, path)
            assert g.dtype == w.dtype and g.shape == w.shape, (step, path)
            np.testing.assert_array_equal(g, w, err_msg=f"step {step} {'/'.join(path)}")


@pytest.mark.parametrize("n", [2, 3])
def test_units_sharding_delivers_every_task_exactly_once(striped, n):
    """With ``units`` every rank runs the same number of steps, and across ranks each task of
    the train split arrives exactly once in an epoch; padding tasks carry no rows."""
    ranks = [TrainInput(_cfg(striped, "units"), _comm(r, n)) for r in range(n)]
    assert len({x.steps_per_epoch for x in ranks}) == 1
    delivered = []
    for x in ranks:
        batches = _epoch(x)
        assert len(batches) == x.steps_per_epoch
        for b in batches:
            assert b["task_id"].shape == (T,)
            padding = b["task_mask"] == 0
            assert not b["support"]["mask"][padding].any() and not b["query"]["mask"][padding].any()
        mine = _real_task_ids(batches)
        assert mine, "every rank gets tasks of its own"
        delivered += mine
    assert sorted(delivered) == _train_task_ids(striped).tolist()


def _leaves(tree, path=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], path + (k,))
    else:
        yield path, tree


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree
