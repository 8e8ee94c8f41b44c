"""Worker: collectives with values that encode the sender's rank, inside tf.function."""
import json
import sys

import numpy as np
import tensorflow as tf
from _guard import guard

from gmeta.trainer.parallel.comm import init_communicator


def main(out_dir):
    comm = init_communicator("horovod")
    r, n = comm.rank, comm.size

    # Rank r sends (j + 1) rows to rank j; each row holds 100 * r + j, so a wrong route shows.
    send_splits = np.array([j + 1 for j in range(n)], dtype=np.int32)
    rows = np.concatenate([np.full((j + 1, 2), 100 * r + j, np.float32) for j in range(n)])

    @tf.function
    def step(x, splits):
        with tf.GradientTape() as tape:
            tape.watch(x)
            recv, recv_splits = comm.alltoall(x, splits, kind="alltoall_vectors")
            # weight received rows by (sender + 1) so each sender's gradient is distinct
            senders = tf.repeat(tf.range(n, dtype=tf.float32), recv_splits)
            loss = tf.reduce_sum(recv * (senders[:, None] + 1.0))
        grad = tape.gradient(loss, x)
        mean, summed = comm.allreduce_mean([tf.fill([3], float(r)), tf.constant([[float(r + 1)]])])
        g_sum = comm.allreduce_sum([tf.constant(float(r))])[0]
        return recv, recv_splits, grad, mean, summed, g_sum

    recv, recv_splits, grad, mean, summed, g_sum = step(tf.constant(rows), tf.constant(send_splits))
    json.dump({
        "rank": r, "size": n,
        "recv": recv.numpy().tolist(), "recv_splits": recv_splits.numpy().tolist(),
        "grad": grad.numpy().tolist(), "mean": mean.numpy().tolist(), "mean2": summed.numpy().tolist(),
        "sum": float(g_sum.numpy()), "counters": comm.counters.snapshot(),
    }, open(f"{out_dir}/rank{r}.json", "w"))


guard(main, sys.argv[1])
