"""Saving a trained model as plain files, and loading it back in one process.

Layout of an export directory::

    gmeta_model.json   model name, model/meta config, schema, embedding layout, model switches,
                       ``vocabularies``: {feature: {vocabulary, kind, version, size}} of the
                       features whose table has one (raw ids -> rows; empty without)
    dense.npz          every replicated model variable by its state name (gmeta.trainer.meta.state)
    embeddings.npz     every embedding table, full (gathered from all shards)
    _vocab/            the training dataset's vocabularies, as the dataset keeps them
                       (gmeta.io.vocab), when it has any: serving maps raw ids through them

Gathering the tables is a collective: every rank calls ``export_model``; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from gmeta.io.schema import Schema
from gmeta.io.vocab import load_vocabularies, save_vocabularies
from gmeta.models.base import ModelConfig
from gmeta.models.registry import build_model
from gmeta.trainer.embedding.build import build_embedding
from gmeta.trainer.embedding.row_optim import RowOptimizerConfig
from gmeta.trainer.meta.learner import MetaConfig, MetaLearner
from gmeta.trainer.meta.state import assign_by_name, run_state
from gmeta.trainer.parallel.comm import LocalCommunicator

EXPORT_FILE = "gmeta_model.json"
# what exports written before a setting existed were trained with (they do not record it)
LEGACY_MODEL_CONFIG = {"adapt": ("head",), "item_prior": False, "target": "auto", "seed": 0}
LEGACY_META_CONFIG = {"inner_solver": "gradient", "ridge_lambda": 1.0}


def export_model(learner, run_config: dict, directory: str, is_writer: bool) -> str | None:
    """Write the export; every rank must call (tables are gathered collectively). The serving
    SavedModel is built from it afterwards (``gmeta.trainer.serving.savedmodel.export_serving``).
    The run's dataset (``run_config["data"]``) lends its vocabularies, if it has any."""
    tables = {name: learner.embedding.gather_full_table(name)
              for name in sorted(t.name for t in learner.embedding.plan.tables)}
    if not is_writer:
        return None
    state = run_state(learner)
    os.makedirs(directory, exist_ok=True)
    model = learner.model
    meta = {
        "format": 2,
        "model": model.name,
        "model_config": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in dataclasses.asdict(model.config).items()},
        "meta_config": dataclasses.asdict(learner.config),
        "schema": model.schema.to_json(),
        "tables": {name: list(t.shape) for name, t in tables.items()},
        "model_state": state.plain,
        "run_config": run_config,
        "vocabularies": copy_vocabularies(run_config.get("data"), directory, model.schema),
    }
    with open(os.path.join(directory, EXPORT_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    np.savez(os.path.join(directory, "dense.npz"),
             **{n: v.numpy() for n, v in state.model_variables().items()})
    np.savez(os.path.join(directory, "embeddings.npz"), **tables)
    return directory


def copy_vocabularies(data: str | None, directory: str, schema: Schema) -> dict:
    """Copy a dataset's vocabularies into an export; ``{feature: {vocabulary, kind, version,
    size}}`` of the features that map raw ids through one, for the export's JSON."""
    vocabs = load_vocabularies(data) if data else {}
    if not vocabs:
        return {}
    save_vocabularies(directory, vocabs)
    return {f.name: {"vocabulary": f.table, "kind": vocabs[f.table].kind, "version": vocabs[f.table].version,
                     "size": vocabs[f.table].size} for f in schema.sparse if f.table in vocabs}


def load_export_vocabularies(directory: str, meta: dict) -> dict:
    """``{feature: Vocabulary}`` of an export (``meta``: its JSON), each the version it recorded."""
    records = meta.get("vocabularies") or {}
    vocabs = load_vocabularies(directory) if records else {}
    out = {}
    for feature, rec in records.items():
        vocab = vocabs.get(rec["vocabulary"])
        if vocab is None or vocab.version != rec["version"]:
            found = "none" if vocab is None else f"version {vocab.version}"
            raise ValueError(f"{directory}: feature {feature} maps through vocabulary {rec['vocabulary']} "
                             f"version {rec['version']}, but the export's _vocab holds {found}; export the "
                             f"model again (its _vocab must be the training dataset's)")
        out[feature] = vocab
    return out


def load_model(directory: str, comm=None):
    """Rebuild (learner, export metadata) from an export directory, in this process."""
    path = os.path.join(directory, EXPORT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not a gmeta model export (no {EXPORT_FILE})")
    with open(path) as f:
        meta = json.load(f)
    schema = Schema.from_json(meta["schema"], source=path)
    mc = {**LEGACY_MODEL_CONFIG, **meta["model_config"]}
    mc["hidden"] = tuple(mc["hidden"])
    mc["adapt"] = tuple(mc["adapt"])
    model = build_model(meta["model"], schema, ModelConfig(**mc))
    comm = comm or LocalCommunicator()
    run = meta.get("run_config", {})
    # the row optimizer is not used after loading; its settings only size the (unused) slots
    optimizer = RowOptimizerConfig(kind=run.get("emb_optimizer", "adagrad"), learning_rate=run.get("emb_lr", 0.05))
    embedding = build_embedding(model, comm, mode="hybrid", optimizer=optimizer, seed=mc["seed"])
    learner = MetaLearner(model, embedding, comm, MetaConfig(**{**LEGACY_META_CONFIG, **meta["meta_config"]}))
    with np.load(os.path.join(directory, "embeddings.npz"), allow_pickle=False) as tables:
        for name in tables.files:
            embedding.set_full_table(name, tables[name])
    state = run_state(learner)
    with np.load(os.path.join(directory, "dense.npz"), allow_pickle=False) as dense:
        assign_by_name(state.model_variables(), {k: dense[k] for k in dense.files},
                       os.path.join(directory, "dense.npz"))
    model.load_plain_state(meta.get("model_state", {}))
    return learner, meta
