"""Champion and challenger: which model wins, from per-task metrics paired over the same tasks.

The rule (``decide``): the challenger replaces the champion when BOTH
  - its mean gain over the champion is at least ``min_gain`` (the smallest gain worth a
    release), and
  - the paired 95% bootstrap interval of that gain lies above zero (lower bound > 0: the gain is
    not noise of the task sample).
The gain is challenger minus champion on the same tasks, with the sign flipped for metrics where
lower is better (logloss, MAE, RMSE), so a positive gain always means the challenger is better.
Anything else keeps the champion; a metric no task defines for both models keeps it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gmeta.trainer.evaluation.metrics import AGGREGATES, paired_difference

RULE = ("promote when the gain (challenger - champion, paired over the same tasks) >= --min-gain and its "
        "95% interval's lower bound > 0")
LOWER_IS_BETTER = ("logloss", "mae", "rmse")
#: the model's own scores; the baselines (item mean, ...) do not depend on the model
SCORERS = ("adapted", "unadapted")
#: the headline's and MLflow's spellings of the nDCG cut-offs (``ndcg10_adapted``)
SPELLINGS = {"ndcg5": "ndcg@5", "ndcg10": "ndcg@10", "ndcg_at5": "ndcg@5", "ndcg_at10": "ndcg@10"}


@dataclass(frozen=True)
class MetricChoice:
    """``user_cold/gauc_adapted``: what the two models are judged on."""
    split: str
    metric: str   # an AGGREGATES name: gauc, ndcg@10, logloss, ...
    scorer: str   # adapted or unadapted

    def __str__(self) -> str:
        return f"{self.split}/{self.metric}_{self.scorer}"


def parse_metric(text: str) -> MetricChoice:
    """``SPLIT/METRIC_SCORER`` as ``gmeta train`` names its headline metrics."""
    split, _, name = text.partition("/")
    metric, _, scorer = name.rpartition("_")
    metric = SPELLINGS.get(metric, metric)
    if not split or metric not in AGGREGATES or scorer not in SCORERS:
        raise ValueError(f"--metric {text!r}: expected SPLIT/METRIC_SCORER, e.g. user_cold/gauc_adapted, with "
                         f"METRIC one of {sorted(AGGREGATES)} and SCORER one of {list(SCORERS)}")
    return MetricChoice(split, metric, scorer)


def paired_gain(challenger: dict, champion: dict, metric: str) -> dict:
    """The challenger's gain over the champion on the tasks both scored (per-task dicts of
    ``metrics.per_task_metrics``, aligned by task id), with its paired 95% interval:
    ``{"metric", "challenger", "champion", "gain", "lo", "hi", "tasks"}``."""
    d = paired_difference(challenger, champion, metric)
    gain, lo, hi = d["diff"], d["lo"], d["hi"]
    if metric in LOWER_IS_BETTER:
        gain, lo, hi = -gain, -hi, -lo
    return {"metric": metric, "challenger": d["a"], "champion": d["b"], "gain": gain, "lo": lo, "hi": hi,
            "tasks": d["tasks"]}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(gain: float, lo: float, min_gain: float) -> Decision:
    """THE promotion rule (module docstring): gain >= min_gain and the interval's lower bound > 0."""
    if math.isnan(gain) or math.isnan(lo):
        return Decision(False, "no task defines the metric for both models (nothing to compare): the champion stays")
    if gain < min_gain:
        return Decision(False, f"gain {gain:+.4f} is below --min-gain {min_gain:g}: the champion stays")
    if lo <= 0:
        return Decision(False, f"gain {gain:+.4f} >= --min-gain {min_gain:g}, but its 95% interval's lower bound "
                               f"{lo:+.4f} is not above 0 (it may be noise of these tasks): the champion stays")
    return Decision(True, f"gain {gain:+.4f} >= --min-gain {min_gain:g} and its 95% interval's lower bound "
                          f"{lo:+.4f} > 0")


def no_champion(where: str) -> Decision:
    """Without a champion the challenger takes the alias: there is nothing it must beat."""
    return Decision(True, f"no champion yet ({where} is not set): the challenger becomes the champion")
