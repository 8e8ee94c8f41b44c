"""Embedding tables for gmeta: one factory over three interchangeable backends.

* ``hybrid``: rows sharded over ranks (r % N), lookups through AlltoAll (gmeta.trainer.embedding.hybrid)
* ``naive``:  full tables replicated, dense all-reduce of gradients (gmeta.trainer.embedding.naive)
* ``sok``:    the hybrid placement with SparseOperationKit's GPU kernels (gmeta.trainer.embedding.sok)
* ``auto``:   ``sok`` when it imports and a GPU is visible, else ``hybrid``

``hot_rows`` (``{table: global rows}``, from ``gmeta.trainer.embedding.tiering.choose_hot``) turns the
hybrid backend into the tiered one (gmeta.trainer.embedding.tiered): those rows replicated on
every rank, the rest sharded; ``hot_sync`` says how replicas are kept equal (sparse | dense).

All backends start from the same global table for a given seed (gmeta.trainer.embedding.initial),
so they and any world size are comparable number for number. Usage::

    emb = make_embedding(mode="hybrid", plan=plan, comm=comm,
                         optimizer=RowOptimizerConfig(kind="adagrad", learning_rate=0.05))
    with tf.GradientTape() as tape:
        vecs = emb.lookup({"item_id": ids})          # {feature: ids.shape + [dim]}
        loss = ...
    emb.apply_gradients(tape.gradient(loss, emb.trainable_variables))
"""

from __future__ import annotations

from gmeta.trainer.embedding.base import EmbeddingBase
from gmeta.trainer.embedding.hybrid import HybridEmbedding
from gmeta.trainer.embedding.naive import NaiveEmbedding
from gmeta.trainer.embedding.plan import ShardingPlan, TableConfig
from gmeta.trainer.embedding.row_optim import RowOptimizerConfig
from gmeta.trainer.embedding.sok import SokEmbedding, sok_available
from gmeta.trainer.embedding.tiered import TieredEmbedding

MODES = ("hybrid", "naive", "sok", "auto")

__all__ = ["make_embedding", "resolve_mode", "EmbeddingBase", "HybridEmbedding",
           "NaiveEmbedding", "RowOptimizerConfig", "ShardingPlan", "TableConfig", "MODES"]


def resolve_mode(mode: str) -> str:
    """Turn ``auto`` into the concrete backend for this host; validate the others."""
    if mode not in MODES:
        raise ValueError(f"embedding mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode

    return "sok" if sok_available()[0] else "hybrid"


def make_embedding(mode: str = "hybrid", *, plan: ShardingPlan, comm,
                   optimizer: RowOptimizerConfig, seed: int = 0,
                   init_stddev: float = 0.05, hot_rows: dict | None = None,
                   hot_sync: str = "sparse") -> EmbeddingBase:
    """Build the embedding tables of ``plan`` for this rank (see module docstring)."""
    concrete = resolve_mode(mode)
    if hot_rows is not None:
        if concrete != "hybrid":
            raise ValueError(f"--tiering replicates hot rows on top of the hybrid placement; it does not "
                             f"combine with --parallel {concrete} (use --parallel hybrid or --tiering off)")
        return TieredEmbedding(plan, comm, optimizer, hot_rows, hot_sync, seed=seed, init_stddev=init_stddev)
    if concrete == "hybrid":
        cls = HybridEmbedding
    elif concrete == "naive":
        cls = NaiveEmbedding
    else:
        cls = SokEmbedding
    return cls(plan, comm, optimizer, seed=seed, init_stddev=init_stddev)
