"""Every piece of state that defines a run, by name, in one place.

Export uses it today; checkpoints and elastic resets build on the same list. Nothing here
knows which zoo model it holds: the model lists its own state (``ZooModel.state_variables`` and
``plain_state``), the learner adds Meta-SGD rates and the outer optimizer's slots, the embedding
adds this rank's shards and their row-wise optimizer slots.
"""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZER_PREFIXES = ("outer_optimizer/", "table_optimizer/")


@dataclass(frozen=True)
class RunState:
    """``replicated``: variables identical on every rank; ``sharded``: this rank's embedding
    shards and slots (``table/<name>[/<slot>]``, whole tables via ``gather_full_table``);
    ``plain``: JSON-able model switches."""

    replicated: dict
    sharded: dict
    plain: dict

    def model_variables(self) -> dict:
        """The replicated variables a trained model needs to predict (no optimizer state)."""
        return {n: v for n, v in self.replicated.items() if not n.startswith(OPTIMIZER_PREFIXES)}


def run_state(learner) -> RunState:
    return RunState(replicated=learner.state_variables(),
                    sharded=learner.embedding.state_variables(),
                    plain=dict(learner.model.plain_state()))


def assign_by_name(variables: dict, values, source: str) -> None:
    """Load ``values`` (a mapping name -> array) into ``variables``; every name must match both
    ways and every shape must agree, or the error names what differs."""
    missing = sorted(set(variables) - set(values))
    unexpected = sorted(set(values) - set(variables))
    if missing or unexpected:
        raise ValueError(f"{source}: state does not match this model (missing {missing}, "
                         f"unexpected {unexpected}); was it written by another model or config?")
    for name, var in variables.items():
        value = values[name]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{source}: {name} has shape {list(value.shape)}, the model expects "
                             f"{var.shape.as_list()}")
        var.assign(value)
