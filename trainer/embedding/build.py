"""Building a model's embedding tables: the plan for the tables it looks up, then the backend."""

from __future__ import annotations

from gmeta.trainer.embedding.factory import make_embedding, resolve_mode
from gmeta.trainer.embedding.plan import ShardingPlan
from gmeta.trainer.embedding.row_optim import RowOptimizerConfig

#: initial rows: normal with this standard deviation (gmeta.trainer.embedding.initial)
INIT_STDDEV = 0.05


def build_plan(model, world_size: int, replicate_under: int = 0) -> ShardingPlan:
    """The plan for the tables the model looks up, at the model's embedding dimension; tables
    of at most ``replicate_under`` bytes replicated."""
    return ShardingPlan.from_schema(model.schema, model.sparse_features, model.config.emb_dim,
                                    world_size, replicate_under)


def build_embedding(model, comm, mode: str, optimizer: RowOptimizerConfig, seed: int, hot_rows=None,
                    hot_sync: str = "sparse", replicate_under: int = 0):
    """This rank's tables of ``model`` over ``comm`` (``mode``: hybrid, naive, sok or auto;
    ``hot_rows``: the tiered backend's replicated rows; ``replicate_under``: the hybrid
    backend holds tables of at most this many bytes whole on every rank, untiered)."""
    if resolve_mode(mode) != "hybrid" or hot_rows is not None:
        replicate_under = 0
    return make_embedding(mode=mode, plan=build_plan(model, comm.size, replicate_under), comm=comm,
                          optimizer=optimizer, seed=seed, init_stddev=INIT_STDDEV, hot_rows=hot_rows,
                          hot_sync=hot_sync)
