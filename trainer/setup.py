"""Building the parallel pieces of a run from a model and a communicator."""

from __future__ import annotations

from gmeta.trainer.sharding import ShardingPlan, TableConfig


def build_plan(model, world_size: int) -> ShardingPlan:
    """One table config per table the model looks up, at the model's embedding dimension."""
    feature_tables = model.embedding_tables()
    tables = []
    for name in sorted(set(feature_tables.values())):
        spec = model.schema.table(name)
        tables.append(TableConfig(name=name, num_rows=spec.num_rows, dim=model.config.emb_dim,
                                  hashed=spec.hashed))
    return ShardingPlan.build(tables, feature_tables, world_size)


def build_embedding(model, comm, mode: str, optimizer: str, learning_rate: float, seed: int,
                    init_stddev: float = 0.05):
    from gmeta.trainer.embedding import make_embedding
    from gmeta.trainer.sparse_optim import RowOptimizerConfig

    plan = build_plan(model, comm.size)
    return make_embedding(mode=mode, plan=plan, comm=comm,
                          optimizer=RowOptimizerConfig(kind=optimizer, learning_rate=learning_rate),
                          seed=seed, init_stddev=init_stddev)
