"""gmeta.io: Meta-IO, task-grouped ORC datasets.

schema (roles of columns) / errors (DataError) / fs (local and HDFS) / validate (vectorized checks)
tables (numpy -> arrow) / writer (TaskWriter) / stripes (open, decode) / index (_index.json and the
stripe scanner) / plan (units, sharding, per-task sizes, column reads) / assemble (numpy
meta-batches) / reader (MetaReader: orchestration and tf.data). Nothing here imports Horovod, and
TensorFlow only inside ``MetaReader.element_spec`` / ``dataset``.
"""
