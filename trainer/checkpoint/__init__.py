"""Checkpoints: ``store`` (the checkpoint files, shard assembly onto any worker count, resume,
init-from, the run's checkpoints). Imports meta, serving (init-from an export), tracking."""
