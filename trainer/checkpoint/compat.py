"""Whether a checkpoint belongs to this run: the config fields and schema that must match.

A resumed run must be the same run: every field of the config but the operational ones, and the
dataset schema, must equal the checkpoint's; each difference is named, so the error says which
flag to restore (or to start a new run from the weights with ``--init-from``).
"""

from __future__ import annotations

import json

from gmeta.trainer.checkpoint.files import FORMAT, CheckpointError, normal_json
from gmeta.trainer.config import TrainConfig, config_dict

# TrainConfig fields that may change between a run and its resumption: where things go, how
# much is logged or evaluated, and how long to train. Every other field defines the run and must
# match the checkpoint (a field the checkpoint predates must equal its default).
OPERATIONAL_FIELDS = frozenset({
    "data", "epochs", "eval_inner_steps", "eval_splits", "validation_split", "tracking_uri",
    "experiment", "run_name", "output_dir", "log_every", "comm", "generator_epochs",
    "loss_rise_tolerance", "checkpoint_dir", "checkpoint_every_steps", "checkpoint_every_secs",
    "keep_checkpoints", "resume", "init_from", "plain_baseline", "register_as", "saved_model",
    "results_json", "support_curve", "stop_grace_secs",
})


def _diff(a, b, path="", out=None, limit=8):
    """Paths where two JSON values differ (at most ``limit``)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}{k} ({'only now' if k not in a else 'only in the checkpoint'})")
            else:
                _diff(a[k], b[k], f"{path}{k}.", out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}{i}.", out, limit)
    elif a != b:
        out.append(f"{path.rstrip('.')}: {json.dumps(a)[:80]} in the checkpoint, {json.dumps(b)[:80]} now")
    return out


def config_differences(saved: dict, current: dict, defaults: dict) -> list:
    """``field: X in the checkpoint, Y now`` for every run-defining field that differs."""
    diffs = []
    for name in sorted(current):
        if name in OPERATIONAL_FIELDS:
            continue
        was = normal_json(saved.get(name, defaults.get(name)))
        now = normal_json(current[name])
        if was != now:
            diffs.append(f"{name}: {json.dumps(was)} in the checkpoint, {json.dumps(now)} now")
    had_plain = saved.get("plain_baseline", "alongside") == "alongside"
    if current.get("meta") == "maml" and current.get("plain_baseline") == "alongside" and not had_plain:
        diffs.append("plain_baseline: the checkpoint has no plain network trained alongside; "
                     "resume with --plain-baseline off")
    return diffs


def check_compatible(path: str, meta: dict, cfg, schema_json: dict) -> None:
    """Raise a CheckpointError naming every difference that makes ``meta`` another run."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, this gmeta reads {FORMAT}")
    defaults = config_dict(TrainConfig(model="", data=""))
    diffs = config_differences(meta.get("config", {}), config_dict(cfg), defaults)
    schema_diffs = _diff(normal_json(meta.get("schema")), normal_json(schema_json), "schema.")
    diffs += schema_diffs
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: it was written by another model, config or dataset schema; "
            f"differences: {'; '.join(diffs)}. Resume with the checkpoint's flags, or start a new run "
            f"from its weights with --init-from {path}")
    position = meta["position"]
    if position["epoch"] > cfg.epochs:
        raise CheckpointError(f"cannot resume from {path}: it is at epoch {position['epoch']} but --epochs "
                              f"is {cfg.epochs}")
