"""Meta-learning: ``learner`` (MetaLearner: one meta-step, the inner loop, evaluation steps),
``dense_optim`` (Adam of the replicated parameters), ``phases`` (extra training phases such as
MetaEmb's generator), ``state`` (every variable of a run by name). Imports parallel, embedding."""
