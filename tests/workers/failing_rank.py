"""Worker: rank 1 fails in the middle of a traced step while rank 0 waits in its collective.

Both ranks finish one allreduce (the job is up), then run a traced step: an alltoall, a check
that fails on rank 1 only, then an allreduce that rank 1 never reaches. Rank 0 blocks in that
allreduce; the guard must end the whole job with rank 1's message instead of hanging.
"""
import tensorflow as tf
from _guard import guard

from gmeta.trainer.parallel.comm import init_communicator

MESSAGE = "rank 1 found a corrupt input file: bad.orc"


def main():
    comm = init_communicator("horovod")
    n = comm.size
    comm.allreduce_mean([tf.constant(1.0)])
    bound = 0.0 if comm.rank == 1 else float(n + 1)  # only rank 1's check fails

    @tf.function
    def step(x):
        got, _ = comm.alltoall(x, tf.ones([n], tf.int32), kind="alltoall_vectors")
        check = tf.debugging.assert_less(tf.reduce_max(got), bound, message=MESSAGE)
        with tf.control_dependencies([check]):
            got = tf.identity(got)
        return comm.allreduce_sum([got])[0]  # rank 0 blocks here until the job is torn down

    step(tf.fill([n, 1], float(comm.rank + 1)))
    return 0


guard(main)
