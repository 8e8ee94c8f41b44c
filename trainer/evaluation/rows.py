"""The keys of what an evaluation gathers, built and parsed here only.

Per query row (``MetaLearner.eval_step`` and the evaluation's gathering): ``task``, ``item``,
``rating``, ``query_position`` and, per head H (the model's score names: ``auc``, and
``auc_ctcvr`` for MAML-ESMM), ``H/label``, ``H/adapted``, ``H/unadapted``; the plain network's
scores under ``plain:H/adapted`` and ``plain:H/unadapted``; the generator's oracle columns under
``oracle/<column>``. Per task (the report's arrays, ``per_task/``): ``H/<scorer>`` for every
scorer (adapted, unadapted, plain, plain_finetuned, item_mean, item_knn, constant, oracle).
"""

from __future__ import annotations

SCORES = ("adapted", "unadapted")
_PLAIN = "plain:"
_LABEL = "label"


def score_key(head: str, scorer: str) -> str:
    """``H/<scorer>``: a head's scores per row (adapted, unadapted) or per task (any scorer)."""
    return f"{head}/{scorer}"


def label_key(head: str) -> str:
    return score_key(head, _LABEL)


def plain_key(head: str, scorer: str) -> str:
    """The plain network's scores of a head (``scorer``: adapted = fine-tuned, unadapted)."""
    return _PLAIN + score_key(head, scorer)


def oracle_key(column: str) -> str:
    return f"oracle/{column}"


def heads_of(keys) -> list:
    """The heads whose labels are among ``keys`` (the model's own, not the plain network's), in
    order: the first is the headline."""
    suffix = "/" + _LABEL
    return [k[:-len(suffix)] for k in keys if k.endswith(suffix) and not k.startswith(_PLAIN)]


def is_score_key(key: str) -> bool:
    """A head's adapted or unadapted scores (what the plain network contributes, prefixed)."""
    return any(key.endswith("/" + s) for s in SCORES)


def plain_of(key: str) -> str:
    """The plain network's name for one of the model's keys."""
    return _PLAIN + key


def headline_of(per_task_keys) -> str | None:
    """The headline head of a per-task dictionary (``H/adapted`` keys; the first one), or None."""
    return next((k.rpartition("/")[0] for k in per_task_keys if k.endswith("/adapted")), None)
