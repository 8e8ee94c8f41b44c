"""Worker: each Horovod rank reads its shard of a Meta-IO split through tf.data and reports.

argv: DATA_DIR OUT_DIR. Writes OUT_DIR/rank{r}.json with the real task ids it delivered, its
step count, the plan's steps_per_epoch, and the sum of an allreduce issued once per step (which
would hang if the ranks ran different numbers of steps).
"""
import json
import sys

import numpy as np
import tensorflow as tf

from gmeta.io.reader import MetaReader
from gmeta.trainer.parallel.comm import init_communicator

data_dir, out_dir = sys.argv[1], sys.argv[2]
comm = init_communicator("horovod")
reader = MetaReader(data_dir, rank=comm.rank, world_size=comm.size, tasks_per_batch=4, support_size=4,
                    query_size=2, shuffle=True, seed=7, num_parallel_reads=1)
task_ids, steps, total = [], 0, 0.0
for batch in reader.dataset(epoch=0):
    real = batch["task_mask"].numpy() > 0
    task_ids += batch["task_id"].numpy()[real].tolist()
    steps += 1
    total = float(comm.allreduce_sum([tf.constant(1.0)])[0].numpy()) + total
json.dump({"rank": comm.rank, "size": comm.size, "task_ids": [int(t) for t in task_ids], "steps": steps,
           "steps_per_epoch": reader.steps_per_epoch, "allreduce_total": total,
           "tasks_planned": reader.num_tasks, "padding_tasks": int(reader.stats["padding_tasks"]),
           "distinct": int(np.unique(task_ids).size)},
          open(f"{out_dir}/rank{comm.rank}.json", "w"))
