"""The learners of a run, built the same way on every rank from the run's config.

A zoo model, what it learns from the training split before the first step (a rating target's
scale, the item prior), its embedding tables (sharded, replicated or tiered) and the
meta-learner over them; the plain network alongside is the same build with ``meta="none"``.
"""

from __future__ import annotations

from gmeta.io.plan import read_columns
from gmeta.models.registry import build_model
from gmeta.trainer.config import TrainConfig, meta_config, model_config, row_optimizer_config
from gmeta.trainer.embedding.build import build_embedding
from gmeta.trainer.embedding.row_optim import slots_per_row
from gmeta.trainer.embedding.tiering import plan_tiering
from gmeta.trainer.meta.learner import MetaLearner
from gmeta.trainer.serving.export import load_model
from gmeta.trainer.tracking.mlflow_run import resolve_export_dir


def plan_run_tiering(cfg: TrainConfig, schema, comm, log):
    """``(hot rows per table, sync)`` for ``--tiering``, or None when it is off."""
    if cfg.tiering_budget is None:
        return None
    model = build_model(cfg.model, schema, model_config(cfg))
    rows = cfg.tasks_per_batch * (int(cfg.support_size) + int(cfg.query_size))
    return plan_tiering(model, cfg.data, cfg.profile_dir, cfg.tiering_budget, slots_per_row(cfg.emb_optimizer),
                        rows, comm.size, cfg.hot_sync, log)


def build_learner(cfg: TrainConfig, schema, comm, meta: str, tiering=None) -> MetaLearner:
    """A zoo model with its embedding tables and meta-learner, identical on every rank;
    ``tiering``: ``(hot rows per table, sync)`` from ``plan_run_tiering``."""
    model = build_model(cfg.model, schema, model_config(cfg))
    fit_to_training_split(model, cfg.data)
    hot_rows, hot_sync = tiering if tiering is not None else (None, "sparse")
    embedding = build_embedding(model, comm, mode=cfg.parallel, optimizer=row_optimizer_config(cfg), seed=cfg.seed,
                                hot_rows=hot_rows, hot_sync=hot_sync, replicate_under=cfg.replicate_under)
    learner = MetaLearner(model, embedding, comm, meta_config(cfg, meta))
    comm.broadcast_variables(learner.dense_variables)
    return learner


def fit_to_training_split(model, data: str) -> None:
    """What a model learns from the training split's columns before the first step (a rating
    target's scale, the item prior), read once, the same on every rank."""
    if model.target != "rating" and not model.prior_feature:
        return
    label = "rating" if model.target == "rating" else model.target
    cols = read_columns(data, "train", [label] + ([model.prior_feature] if model.prior_feature else []))
    model.fit_target(cols[label])
    if model.prior_feature:
        model.fit_item_prior(cols[model.prior_feature], cols[label])


def load_plain_baseline(source: str, tracking_uri) -> MetaLearner:
    """A trained ``--meta none`` model from an export directory, a models:/ or runs:/ URI or an
    MLflow run id, loaded in this process."""
    learner, _ = load_model(resolve_export_dir(source, tracking_uri))
    if learner.config.meta != "none":
        raise ValueError(f"--plain-baseline {source}: that model was trained with --meta "
                         f"{learner.config.meta}; the plain baseline must be a --meta none run")
    return learner
