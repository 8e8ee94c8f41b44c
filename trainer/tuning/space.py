"""The search spaces of ``gmeta tune``: what each zoo model searches, sampling a point, and putting
it into a TrainConfig (a point is {param name: config value})."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gmeta.trainer.config import TrainConfig


@dataclass(frozen=True)
class Param:
    """One searched hyper-parameter: a TrainConfig field, or ``extra.KEY`` (``--extra KEY=...``).

    kind: ``float`` / ``int`` in [low, high] (``log`` scale optional; ``off`` adds one more value,
    e.g. clip_norm 0 = off, sampled half of the time), ``bool``, or ``choice`` among ``choices``
    (comma separated strings for tuple fields such as hidden and adapt).
    ``requires_field``: the entry is skipped while TrainConfig has no such field.
    """
    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()
    off: float | None = None
    requires_field: str = ""

    def describe(self) -> str:
        if self.kind in ("float", "int"):
            rng = f"{self.low:g}..{self.high:g}" + (" log" if self.log else "")
            return rng if self.off is None else f"{self.off:g} (off) or {rng}"
        if self.kind == "bool":
            return "false | true"
        return " | ".join(str(c) for c in self.choices)


SHARED_SPACE = (
    Param("inner_solver", "choice", choices=("ridge", "gradient")),
    Param("ridge_lambda", "float", 0.03, 10.0, log=True),
    Param("plain_loss_weight", "float", 0.0, 2.0),
    Param("inner_lr", "float", 0.01, 1.0, log=True),
    Param("inner_steps", "int", 1, 5),
    Param("outer_lr", "float", 1e-3, 3e-2, log=True),
    Param("emb_lr", "float", 0.02, 0.5, log=True),
    Param("meta_sgd", "bool"),
    Param("first_order", "bool"),
    Param("hidden", "choice", choices=("32,32", "64,64", "128,64", "64")),
    Param("emb_dim", "choice", choices=(8, 16, 32)),
    Param("clip_norm", "float", 1.0, 10.0, log=True, off=0.0),
    # --adapt (what the inner loop adapts, gmeta.models.base.ADAPT_PARTS). Skipped automatically
    # while TrainConfig has no `adapt` field; the choices are valid combinations (head and last
    # exclude each other).
    Param("adapt", "choice", requires_field="adapt",
          choices=("head", "last", "head,bias", "last,bias", "last,user", "last,pref,bias",
                   "head,user,pref,bias", "user,pref,bias")),
)

MODEL_SPACES = {
    "melu": SHARED_SPACE,
    "maml_dnn": SHARED_SPACE,
    "maml_esmm": SHARED_SPACE,
    "metaemb": SHARED_SPACE + (
        Param("extra.alpha", "float", 0.05, 0.9),            # generator: weight of the cold loss
        Param("extra.warmup_lr", "float", 0.01, 1.0, log=True),  # generator: warm-up step size
    ),
}


def search_space(model: str, names=None, fixed=()) -> tuple:
    """The model's searched parameters: entries whose field exists, restricted to ``names`` when
    given, minus the ``fixed`` ones (held by ``--set``)."""
    if model not in MODEL_SPACES:
        raise ValueError(f"gmeta tune has no search space for --model {model!r}; known: {sorted(MODEL_SPACES)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    space = [p for p in MODEL_SPACES[model]
             if not p.requires_field or p.requires_field in fields]
    if names:
        known = {p.name for p in space}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--params {','.join(unknown)}: not in {model}'s search space {sorted(known)}")
        space = [p for p in space if p.name in names]
    return tuple(p for p in space if p.name not in fixed)


def space_help() -> str:
    lines = ["search space (--params restricts it; --set KEY=VALUE holds a field fixed):"]
    for p in SHARED_SPACE:
        note = f"  [only while TrainConfig has '{p.requires_field}']" if p.requires_field else ""
        lines.append(f"  {p.name:<14} {p.describe()}{note}")
    for model, space in MODEL_SPACES.items():
        extra = [p for p in space if p not in SHARED_SPACE]
        for p in extra:
            lines.append(f"  {p.name:<14} {p.describe()}  [{model} only]")
    return "\n".join(lines)


def suggest(trial, space) -> dict:
    """Sample the space; returns {param name: config value} (tuples for tuple fields)."""
    values = {}
    for p in space:
        if p.kind == "bool":
            values[p.name] = trial.suggest_categorical(p.name, [False, True])
        elif p.kind == "choice":
            values[p.name] = _choice_value(p.name, trial.suggest_categorical(p.name, list(p.choices)))
        else:
            if p.off is not None and not trial.suggest_categorical(f"{p.name}_on", [False, True]):
                values[p.name] = p.off
                continue
            if p.kind == "int":
                values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            else:
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
    return values


def _choice_value(name: str, choice):
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}.get(name)
    if isinstance(default, tuple) and isinstance(choice, str):
        kind = type(default[0]) if default else str
        return tuple(kind(c.strip()) for c in choice.split(",") if c.strip())
    return choice


def apply_values(cfg, values: dict):
    """``cfg`` with the sampled values (``extra.KEY`` go into ``cfg.extra``)."""
    plain = {k: v for k, v in values.items() if not k.startswith("extra.")}
    extra = {k[len("extra."):]: v for k, v in values.items() if k.startswith("extra.")}
    if extra:
        plain["extra"] = {**cfg.extra, **extra}
    return dataclasses.replace(cfg, **plain)


def jsonable(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def show_value(v) -> str:
    """A sampled value as the trial lines and the trials table print it."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v)
