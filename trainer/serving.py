"""Scoring plain rows (no support set) with a loaded model: the unadapted prediction."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def score_rows(learner, frame) -> np.ndarray:
    model = learner.model
    schema = model.schema
    missing = [c for c in list(model.sparse_features) + list(model.dense_features) if c not in frame.columns]
    if missing:
        raise ValueError(f"input is missing columns {missing}")
    part = {}
    for name in model.sparse_features:
        feature = schema.feature(name)
        if feature.is_list:
            ids = np.full((len(frame), feature.max_len), -1, np.int64)
            for i, values in enumerate(frame[name]):  # serving path, not training
                values = list(values)[:feature.max_len]
                ids[i, :len(values)] = values
            part[name] = tf.constant(ids[None])
        else:
            part[name] = tf.constant(frame[name].to_numpy(np.int64)[None])
    for name in model.dense_features:
        part[name] = tf.constant(frame[name].to_numpy(np.float32)[None])
    part["mask"] = tf.ones([1, len(frame)])
    for label in schema.labels:
        part[label] = tf.zeros([1, len(frame)])
    vectors = learner.embedding.lookup({f: part[f] for f in model.sparse_features})
    x = model.build_inputs(vectors, part)
    scores = model.scores(model.forward(learner.params(), x), part)
    return next(iter(scores.values()))[0].numpy()[0]
