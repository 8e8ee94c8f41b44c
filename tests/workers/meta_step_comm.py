"""Worker: the collectives of one meta-step (hybrid or naive), counted by the comm counters.

argv: OUT_DIR TESTS_DIR MODE. Rank r trains on ``make_batch(seed=r)`` with the schema of
tests/test_meta_learner.py (three tables, all looked up by maml_dnn), traces the step, then counts
ONE step with 1 and with 3 inner steps. It reports the counters and the shapes of the dense
variables; the test derives the expected bytes itself.
"""
import json
import sys

import tensorflow as tf

sys.path.insert(0, sys.argv[2])  # tests/ for the batch builder
from _configs import LOOP_TEST_SETTINGS, part_configs  # noqa: E402
from _guard import guard  # noqa: E402
from test_meta_learner import SCHEMA, make_batch  # noqa: E402

from gmeta.models.registry import build_model  # noqa: E402
from gmeta.trainer.embedding.build import build_embedding  # noqa: E402
from gmeta.trainer.meta.learner import MetaLearner  # noqa: E402
from gmeta.trainer.parallel.comm import init_communicator  # noqa: E402

EMB_DIM = 4


def main(out_dir, mode):
    comm = init_communicator("horovod")
    result = {"mode": mode}
    for inner_steps in (1, 3):
        model_cfg, meta_cfg, row_cfg = part_configs("maml_dnn", **{**LOOP_TEST_SETTINGS, "emb_dim": EMB_DIM,
                                                                   "inner_steps": inner_steps,
                                                                   "emb_optimizer": "adagrad", "emb_lr": 0.1})
        model = build_model("maml_dnn", SCHEMA, model_cfg)
        emb = build_embedding(model, comm, mode=mode, optimizer=row_cfg, seed=3)
        learner = MetaLearner(model, emb, comm, meta_cfg)
        step = tf.function(learner.train_step, autograph=False)
        batch = make_batch(seed=comm.rank)
        step(batch)  # trace
        comm.counters.reset()
        step(batch)
        result[f"inner{inner_steps}"] = comm.counters.snapshot()
    result["tables"] = {t.name: [t.num_rows, t.dim] for t in emb.plan.tables}
    result["looked_up"] = sorted(model.embedding_tables().items())
    result["dense_shapes"] = [[list(v.shape), v.dtype.size] for v in learner.dense_variables]
    json.dump(result, open(f"{out_dir}/rank{comm.rank}.json", "w"))


guard(main, sys.argv[1], sys.argv[3])
