"""Saving a trained model as plain files, and loading it back in one process.

Layout of an export directory::

    gmeta_model.json   model name, model/meta config, schema, embedding layout
    dense.npz          every dense variable (model params, Meta-SGD rates, extras) by name
    embeddings.npz     every embedding table, full (gathered from all shards)

Gathering the tables is a collective: every rank calls ``export_model``; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

EXPORT_FILE = "gmeta_model.json"


def _dense_state(learner) -> dict:
    model = learner.model
    state = {f"params/{n}": v.numpy() for n, v in model.params.items()}
    state.update({f"inner_lr/{n}": v.numpy() for n, v in learner.inner_lrs.items()})
    for n, v in getattr(model, "gen_params", {}).items():
        state[f"gen/{n}"] = v.numpy()
    if hasattr(model, "seen"):
        state["seen"] = model.seen.numpy()
    return state


def export_model(learner, run_config: dict, directory: str, is_writer: bool) -> str | None:
    """Write the export; every rank must call (tables are gathered collectively)."""
    tables = {name: learner.embedding.gather_full_table(name)
              for name in sorted(t.name for t in learner.embedding.plan.tables)}
    if not is_writer:
        return None
    os.makedirs(directory, exist_ok=True)
    model = learner.model
    meta = {
        "format": 1,
        "model": model.name,
        "model_config": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in dataclasses.asdict(model.config).items()},
        "meta_config": dataclasses.asdict(learner.config),
        "schema": model.schema.to_json(),
        "tables": {name: list(t.shape) for name, t in tables.items()},
        "run_config": run_config,
    }
    with open(os.path.join(directory, EXPORT_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    np.savez(os.path.join(directory, "dense.npz"), **_dense_state(learner))
    np.savez(os.path.join(directory, "embeddings.npz"), **tables)
    return directory


def load_model(directory: str, comm=None):
    """Rebuild (learner, export metadata) from an export directory, in this process."""
    from gmeta.io.schema import Schema
    from gmeta.models.base import ModelConfig
    from gmeta.models.registry import build_model
    from gmeta.trainer.comm import LocalCommunicator
    from gmeta.trainer.meta_learner import MetaConfig, MetaLearner
    from gmeta.trainer.setup import build_embedding

    path = os.path.join(directory, EXPORT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not a gmeta model export (no {EXPORT_FILE})")
    with open(path) as f:
        meta = json.load(f)
    schema = Schema.from_json(meta["schema"], source=path)
    mc = dict(meta["model_config"])
    mc["hidden"] = tuple(mc["hidden"])
    model = build_model(meta["model"], schema, ModelConfig(**mc))
    comm = comm or LocalCommunicator()
    run = meta.get("run_config", {})
    embedding = build_embedding(model, comm, mode="hybrid", optimizer=run.get("emb_optimizer", "adagrad"),
                                learning_rate=run.get("emb_lr", 0.05), seed=mc.get("seed", 0))
    learner = MetaLearner(model, embedding, comm, MetaConfig(**meta["meta_config"]))
    with np.load(os.path.join(directory, "embeddings.npz")) as tables:
        for name in tables.files:
            embedding.set_full_table(name, tables[name])
    with np.load(os.path.join(directory, "dense.npz")) as dense:
        for key in dense.files:
            kind, _, name = key.partition("/")
            if kind == "params":
                model.params[name].assign(dense[key])
            elif kind == "inner_lr":
                learner.inner_lrs[name].assign(dense[key])
            elif kind == "gen":
                model.gen_params[name].assign(dense[key])
            elif key == "seen":
                model.seen.assign(dense[key])
    if hasattr(model, "generate_for"):
        model.generate_for = "cold"
    return learner, meta
