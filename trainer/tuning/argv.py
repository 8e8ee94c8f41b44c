"""A TrainConfig as ``gmeta train`` arguments and back, with train's own parser: the base config
of a study (``--set``), the command line that reruns a trial, and its check."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex

from gmeta.trainer import config
from gmeta.trainer.config import TrainConfig


class _TrainParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(f"gmeta train flags: {message}")


def train_parser() -> argparse.ArgumentParser:
    p = _TrainParser(prog="gmeta train", add_help=False)
    config.add_arguments(p)
    return p


def _actions(parser) -> dict:
    return {a.dest: a for a in parser._actions if a.option_strings}


def _flag(action) -> str:
    return max((s for s in action.option_strings if s.startswith("--")), key=len)


def _text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _extra_text(value) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value)


def _field_argv(action, name: str, value) -> list:
    flag = _flag(action)
    if name == "extra":
        return [a for k, v in sorted(value.items()) for a in (flag, f"{k}={_extra_text(v)}")]
    if isinstance(value, bool):
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        if isinstance(action, argparse._StoreTrueAction):
            return [flag] if value else []
        if isinstance(action, argparse._StoreFalseAction):
            return [] if value else [flag]
    return [flag, _text(value)]


_ENV_DEFAULTS = ("tracking_uri", "experiment")  # gmeta.trainer.tracking.mlflow_run.add_tracking_arguments


def config_argv(cfg, parser=None, force=()) -> list:
    """``gmeta train`` arguments that rebuild ``cfg``: model, data, every field that differs from
    its default, and the ``force``d fields (tuned ones) even when they equal it."""
    parser = parser or train_parser()
    actions = _actions(parser)
    default = TrainConfig(model="", data="")
    argv = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        action = actions.get(f.name)
        # a flag whose default comes from the environment (MLFLOW_TRACKING_URI, ...) is written
        # out unless it equals that default too: the command must mean the same in another shell
        env_default = f.name in _ENV_DEFAULTS and action is not None and value != action.default
        if (f.name not in ("model", "data") and f.name not in force and value == getattr(default, f.name)
                and not env_default):
            continue
        if action is None:
            raise ValueError(f"TrainConfig.{f.name} has no gmeta train flag")
        argv += _field_argv(action, f.name, value)
    return argv


def config_from_argv(argv, parser=None):
    return config.config_from_args((parser or train_parser()).parse_args(argv))


def rerun_command(cfg, tuned) -> str:
    """One ``gmeta train`` command line that rebuilds ``cfg`` (checked by parsing it back)."""
    parser = train_parser()
    argv = config_argv(cfg, parser, force={n for n in tuned if not n.startswith("extra.")})
    back = config_from_argv(argv, parser)
    if back != cfg:
        diff = [f.name for f in dataclasses.fields(cfg) if getattr(back, f.name) != getattr(cfg, f.name)]
        raise RuntimeError(f"the rerun command does not reproduce the trial's config (fields {diff})")
    return shlex.join(["gmeta", "train", *argv])


# tune's own flags (and fields it manages per trial) cannot be --set
_OWN = {"model": "--model", "data": "--data", "epochs": "--epochs", "validation_split": "--validation-split",
        "tracking_uri": "--tracking-uri", "experiment": "--experiment"}
_MANAGED = ("run_name", "output_dir", "eval_splits", "plain_baseline", "comm", "saved_model", "support_curve")


def set_argv(items, parser) -> tuple:
    """``--set KEY=VALUE`` items -> (gmeta train arguments, the field names they fix)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    actions = _actions(parser)
    argv, fixed = [], []
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key.startswith("extra."):
            argv += ["--extra", f"{key[len('extra.'):]}={value}"]
            fixed.append(key)
            continue
        if key in _OWN:
            raise ValueError(f"--set {key}: use gmeta tune's {_OWN[key]} flag")
        if key in _MANAGED:
            raise ValueError(f"--set {key}: gmeta tune sets it for every trial (eval_splits = the validation "
                             "split, plain_baseline off, comm local in-process, run_name and output_dir per trial)")
        if key not in fields or key not in actions:
            raise ValueError(f"--set {key}: not a TrainConfig field with a gmeta train flag")
        action = actions[key]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--set {key}={value}: expected true or false")
            argv += _field_argv(action, key, low in ("true", "1", "yes"))
        elif key == "extra":
            argv += ["--extra", value]
        else:
            argv += [_flag(action), value]
        fixed.append(key)
    return argv, tuple(fixed)

