"""Worker: N ranks training on slices of a global batch == one process on the whole batch.

argv: OUT_DIR TESTS_DIR MODES MODEL (MODES comma separated; ``tiered-sparse`` / ``tiered-dense``
are hybrid with rows 0-4 of every table replicated). Every rank also runs the single-process
reference on the whole global batch (LocalCommunicator) and reports the largest differences.
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
from gmeta.trainer.parallel.comm import LocalCommunicator, init_communicator  # noqa: E402

T_LOCAL = 3
OUTER_LR = 0.01


def main(out_dir, modes, model_name):
    comm = init_communicator("horovod")
    result = {mode: run_mode(comm, mode, model_name) for mode in modes.split(",")}
    json.dump(result, open(f"{out_dir}/rank{comm.rank}.json", "w"))


def run_mode(comm, mode, model_name):
    n, r = comm.size, comm.rank

    def learner_for(c, emb_mode):
        model_cfg, meta_cfg, row_cfg = part_configs(model_name, **{**LOOP_TEST_SETTINGS, "inner_steps": 2,
                                                                   "inner_lr": 0.3, "outer_lr": OUTER_LR,
                                                                   "emb_optimizer": "adagrad", "emb_lr": 0.1})
        model = build_model(model_name, SCHEMA, model_cfg)
        tiered = emb_mode.startswith("tiered-")
        hot = {t.name: list(range(min(5, t.num_rows))) for t in SCHEMA.tables} if tiered else None
        emb = build_embedding(model, c, mode="hybrid" if tiered else emb_mode, optimizer=row_cfg, seed=3,
                              hot_rows=hot, hot_sync=emb_mode.split("-", 1)[1] if tiered else "sparse")
        return MetaLearner(model, emb, c, meta_cfg)

    def global_batch(step):
        # the last task is padding, so the last rank holds fewer real tasks than the others
        return make_batch(T=T_LOCAL * n, seed=100 + step)

    dist = learner_for(comm, mode)
    ref = learner_for(LocalCommunicator(), "hybrid")
    initial = {k: v.numpy().copy() for k, v in ref.model.params.items()}
    dist_step, ref_step = (tf.function(dist.train_step, autograph=False), tf.function(ref.train_step, autograph=False))
    losses, first_step_move = [], None
    for step in range(3):
        g = global_batch(step)
        mine = tf.nest.map_structure(lambda t: t[r * T_LOCAL:(r + 1) * T_LOCAL], g)
        loss_sum, count = dist.meta_loss_sum(mine)
        total, n_tasks = comm.allreduce_sum([loss_sum, count])
        losses.append([float(total / n_tasks), float(ref.meta_loss(g))])
        dist_step(mine)
        ref_step(g)
        if step == 0:
            # Adam's first step moves every parameter with a non-zero gradient by ~outer_lr
            first_step_move = max(float(np.max(np.abs(v.numpy() - initial[k])))
                                  for k, v in ref.model.params.items())

    dense = {k: float(np.max(np.abs(dist.model.params[k].numpy() - ref.model.params[k].numpy())))
             for k in dist.model.params}
    tables = {}
    for t in dist.embedding.plan.tables:
        full = dist.embedding.gather_full_table(t.name)
        tables[t.name] = float(np.max(np.abs(full - ref.embedding.gather_full_table(t.name))))
    return {"losses": losses, "dense_max_diff": dense, "table_max_diff": tables,
            "first_step_move": first_step_move, "outer_lr": OUTER_LR}


guard(main, sys.argv[1], sys.argv[3], sys.argv[4])
