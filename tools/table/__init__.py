"""``gmeta convert table``: any event table (Parquet, ORC or CSV) into Meta-IO tasks, in two
streamed passes through hash-partitioned temporary files so the input may exceed memory.

``spec`` defines the one frozen config and ``config`` reads it from a spec file and flags;
``source`` opens the inputs and side tables; ``extract`` turns a batch into checked columns;
``stats`` counts per key; ``partition`` is the external group-by's disk side and the memory
plan; ``protocol`` decides tasks, roles and splits; ``encode`` maps raw values to rows;
``command`` runs the passes.
"""
