"""Worker: MetaEmb's generator phase on N ranks == one process on the whole batch.

argv: OUT_DIR TESTS_DIR. Ranks hold uneven numbers of real tasks (the global batch ends with a
padding task, and one real task has no query rows), so a per-rank mean averaged over ranks
would differ from the global mean; the step must follow the one scaling rule.
"""
import json
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, sys.argv[2])  # tests/ for the batch builder
from _configs import LOOP_TEST_SETTINGS, part_configs  # noqa: E402
from _guard import guard  # noqa: E402
from test_meta_learner import SCHEMA, make_batch  # noqa: E402

from gmeta.models.registry import build_model  # noqa: E402
from gmeta.trainer.embedding.build import build_embedding  # noqa: E402
from gmeta.trainer.meta.learner import MetaLearner  # noqa: E402
from gmeta.trainer.meta.phases import PhaseStep  # noqa: E402
from gmeta.trainer.parallel.comm import LocalCommunicator, init_communicator  # noqa: E402

T_LOCAL = 3


def main(out_dir):
    comm = init_communicator("horovod")
    n, r = comm.size, comm.rank

    def phase_step(c):
        model_cfg, meta_cfg, row_cfg = part_configs("metaemb", **{**LOOP_TEST_SETTINGS, "inner_lr": 0.3,
                                                                  "emb_optimizer": "adagrad", "emb_lr": 0.1})
        model = build_model("metaemb", SCHEMA, model_cfg)
        emb = build_embedding(model, c, mode="hybrid", optimizer=row_cfg, seed=3)
        learner = MetaLearner(model, emb, c, meta_cfg)
        return PhaseStep(model.training_phases()[0], learner, learning_rate=0.01)

    dist, ref = phase_step(comm), phase_step(LocalCommunicator())
    initial = [v.numpy().copy() for v in ref.variables_]
    for step in range(2):
        g = make_batch(T=T_LOCAL * n, seed=200 + step)
        query_mask = g["query"]["mask"].numpy().copy()
        query_mask[1] = 0.0  # a real task without query rows: it must not count
        g = dict(g, query=dict(g["query"], mask=tf.constant(query_mask)))
        mine = tf.nest.map_structure(lambda t: t[r * T_LOCAL:(r + 1) * T_LOCAL], g)
        dist.step(mine)
        ref.step(g)
    diffs = [float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(dist.variables_, ref.variables_)]
    moved = max(float(np.max(np.abs(v.numpy() - i))) for v, i in zip(ref.variables_, initial))
    json.dump({"max_diff": max(diffs), "moved": moved}, open(f"{out_dir}/rank{r}.json", "w"))


guard(main, sys.argv[1])
