"""``gmeta bench NAME``: ``cli`` dispatches to one module per benchmark (reader, step, meta,
memory, projection, movielens, breakdown, hot, coldstart); each prints a table and one JSON line."""
