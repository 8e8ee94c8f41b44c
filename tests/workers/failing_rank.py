"""Worker: rank 1 raises while rank 0 waits in an allreduce; the job must end, not hang."""
import sys

import tensorflow as tf

from gmeta.trainer.comm import init_communicator
from gmeta.trainer.launch import run_guarded


def body():
    comm = init_communicator("horovod")
    comm.allreduce_mean([tf.constant(1.0)])
    if comm.rank == 1:
        raise RuntimeError("rank 1 found a corrupt input file: bad.orc")
    comm.allreduce_mean([tf.constant(2.0)])  # rank 0 blocks here until the job is torn down
    return 0


sys.exit(run_guarded(body))
