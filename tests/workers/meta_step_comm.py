"""Worker: the communication shape of one hybrid meta-step, counted by the comm counters."""
import json
import sys

import tensorflow as tf

sys.path.insert(0, sys.argv[2])  # tests/ for the batch builder
from test_meta_learner import SCHEMA, make_batch  # noqa: E402

from gmeta.models.base import ModelConfig  # noqa: E402
from gmeta.models.registry import build_model  # noqa: E402
from gmeta.trainer.comm import init_communicator  # noqa: E402
from gmeta.trainer.meta_learner import MetaConfig, MetaLearner  # noqa: E402
from gmeta.trainer.setup import build_embedding  # noqa: E402

out_dir = sys.argv[1]
comm = init_communicator("horovod")
result = {}
for inner_steps in (1, 3):
    model = build_model("maml_dnn", SCHEMA, ModelConfig(emb_dim=4, hidden=(8,), seed=1))
    emb = build_embedding(model, comm, mode="hybrid", optimizer="adagrad", learning_rate=0.1, seed=3)
    learner = MetaLearner(model, emb, comm, MetaConfig(inner_steps=inner_steps))
    step = tf.function(learner.train_step)
    batch = make_batch(seed=comm.rank)
    step(batch)  # trace
    comm.counters.reset()
    step(batch)
    result[f"inner{inner_steps}"] = comm.counters.snapshot()
result["tables"] = len(emb.plan.tables)
result["dense_bytes"] = sum(int(tf.size(v)) * 4 for v in learner.dense_variables)
json.dump(result, open(f"{out_dir}/rank{comm.rank}.json", "w"))
