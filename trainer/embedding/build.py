"""Building the parallel pieces of a run from a model and a communicator."""

from __future__ import annotations

from gmeta.trainer.embedding.plan import ShardingPlan


def build_plan(model, world_size: int) -> ShardingPlan:
    """The plan for the tables the model looks up, at the model's embedding dimension."""
    return ShardingPlan.from_schema(model.schema, model.sparse_features, model.config.emb_dim,
                                    world_size)


def build_embedding(model, comm, mode: str, optimizer: str, learning_rate: float, seed: int,
                    init_stddev: float = 0.05, hot_rows=None, hot_sync: str = "sparse"):
    from gmeta.trainer.embedding.factory import make_embedding
    from gmeta.trainer.embedding.row_optim import RowOptimizerConfig

    plan = build_plan(model, comm.size)
    return make_embedding(mode=mode, plan=plan, comm=comm,
                          optimizer=RowOptimizerConfig(kind=optimizer, learning_rate=learning_rate),
                          seed=seed, init_stddev=init_stddev, hot_rows=hot_rows, hot_sync=hot_sync)
