"""Cold-start evaluation: ``metrics`` (per-task metrics and bootstrap intervals, the one
implementation), ``baselines`` (constant, item mean, item-kNN), ``splits`` (evaluating splits
across ranks into reports), ``report`` (tables, per-task files), ``support_curve``, ``plots``,
``promotion`` (the champion/challenger rule over paired per-task metrics).
Imports meta (learners it evaluates) and gmeta.io."""
