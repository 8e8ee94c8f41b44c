"""The parts' configs the tests build: the command line's (TrainConfig) with some settings changed,
since the sub-configs have no defaults of their own."""

from gmeta.trainer.config import defaults, part_configs as _parts

#: the learner settings the unit tests of the loops were written for (the learner's defaults of
#: the previous releases; the command line's differ): the whole head adapts by gradient steps
LOOP_TEST_SETTINGS = dict(adapt=("head",), inner_solver="gradient", plain_loss_weight=0.0, inner_lr=0.5,
                          outer_lr=1e-3, item_prior=False, emb_dim=4, hidden=(8,), seed=1)


def part_configs(model: str, **overrides):
    """``(ModelConfig, MetaConfig, RowOptimizerConfig)`` as the command line builds them for
    ``model`` with ``overrides`` (TrainConfig field names)."""
    return _parts(defaults(model, **overrides))
