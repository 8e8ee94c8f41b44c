"""Checkpoints: ``files`` (the on-disk format, atomic writes with checksums, verified reads,
listing), ``assemble`` (a learner's state as arrays, re-sharded onto any worker count on
restore), ``save`` (writing one checkpoint on every rank and committing it), ``compat`` (whether
a checkpoint belongs to this run's config and schema), ``init_from`` (``--init-from``: weights
from an export or a checkpoint) and ``run_checkpoints`` (``RunCheckpoints``: one run's directory,
schedule and resume). Imports parallel, meta, serving (init-from an export), tracking, config."""
