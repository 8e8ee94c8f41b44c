"""Embedding tables over workers: ``plan`` (the sharding plan as plain data), ``base`` /
``hybrid`` / ``naive`` / ``tiered`` / ``sok`` (the backends), ``initial`` (identical initial
rows), ``row_optim`` (row-wise optimizers), ``tiering`` (which rows are hot), ``factory``
(``make_embedding``) and ``build`` (a model's plan and tables). Imports gmeta.trainer.parallel."""
