"""The spec file (JSON, or YAML where PyYAML is installed) and the flags of ``gmeta convert
table`` -> one frozen ``TableConfig``: defaults < spec < flags (a flag given wins over the
spec's field; features named by flags are added to the spec's)."""

from __future__ import annotations

import json
from dataclasses import fields, replace

from gmeta.io import fs
from gmeta.io.schema import LABEL_NAMES
from gmeta.tools.table.spec import ColdRule, Dense, Derive, Feature, Join, Label, SpecError, TableConfig

try:
    import yaml
except ImportError:  # YAML specs need PyYAML (MLflow brings it along); JSON always works
    yaml = None

SPEC_KEYS = ("input", "format", "csv_delimiter", "task", "task_kind", "order", "timestamp_format", "query",
             "min_events", "max_events", "labels", "join", "derive", "sparse", "min_count", "dense",
             "item_id_feature", "cold", "split_column", "val_fraction", "negatives", "seed")


def _known(d: dict, keys, where: str) -> dict:
    if not isinstance(d, dict):
        raise SpecError(f"{where}: expected an object with keys from {list(keys)}, got {d!r}")
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; expected a subset of {list(keys)}")
    return d


# ---------------------------------------------------------------------------------- spec file
def read_spec(path: str) -> dict:
    """The spec file as a dict: JSON, or YAML (.yaml / .yml) where PyYAML is installed."""
    try:
        text = fs.read_text(path)
    except FileNotFoundError:
        raise SpecError(f"--spec {path!r}: file not found") from None
    if path.endswith((".yaml", ".yml")):
        if yaml is None:
            raise SpecError(f"--spec {path!r}: reading YAML needs PyYAML (pip install pyyaml); or write the spec "
                            f"as JSON")
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"--spec {path!r}: not valid YAML: {exc}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"--spec {path!r}: not valid JSON: {exc}") from None
    return _known(d if d is not None else {}, SPEC_KEYS, f"--spec {path}")


def _list(value, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float, dict)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise SpecError(f"{where}: expected a value or a list, got {value!r}")


def _build(cls, d, where: str, required=()):
    """A spec dataclass from an object (a plain string: its first field)."""
    if isinstance(d, str):
        d = {fields(cls)[0].name: d}
    d = dict(_known(d, [f.name for f in fields(cls)], where))
    missing = [k for k in required if k not in d]
    if missing:
        raise SpecError(f"{where}: missing {missing}")
    for k in ("drop", "columns", "buckets"):
        if k in d:
            d[k] = tuple(_list(d[k], f"{where}.{k}"))
    try:
        return cls(**d)
    except TypeError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _named(d):
    """A feature entry: a column name alone, or an object where name and column default to each other."""
    if isinstance(d, str):
        return {"name": d, "column": d}
    if isinstance(d, dict) and ("name" in d) != ("column" in d):
        return {"name": d.get("name", d.get("column")), "column": d.get("column", d.get("name")), **d}
    return d


def _feature(d, where: str) -> Feature:
    return _build(Feature, _named(d), where, required=("name", "column"))


def _dense(d, where: str) -> Dense:
    return _build(Dense, _named(d), where, required=("name", "column"))


def _cold(d, where: str) -> ColdRule:
    if d is None:
        return ColdRule()
    d = _known(d, [f.name for f in fields(ColdRule)], where)
    try:
        return ColdRule(after=d.get("after"), fraction=float(d.get("fraction", 0.0)),
                        random=bool(d.get("random", False)), column=str(d.get("column", "")),
                        by=str(d.get("by", "")))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from None


def spec_fields(spec: dict) -> dict:
    """The spec file's fields as ``TableConfig`` keyword arguments."""
    out = {}
    if "input" in spec:
        out["inputs"] = tuple(str(p) for p in _list(spec["input"], "spec: input"))
    for key in ("format", "csv_delimiter", "task_kind", "timestamp_format", "item_id_feature", "split_column"):
        if key in spec:
            out[key] = str(spec[key] or "")
    for key in ("min_events", "max_events", "min_count", "seed"):
        if key in spec:
            out[key] = int(spec[key] or 0)
    if "val_fraction" in spec:
        out["val_fraction"] = float(spec["val_fraction"])
    if "task" in spec:
        task = spec["task"]
        if isinstance(task, dict):
            task = _known(task, ("column", "kind"), "spec: task")
            out["task_kind"] = str(task.get("kind", out.get("task_kind", "user")))
            task = task.get("column", "")
        out["task"] = str(task)
    if "order" in spec:
        out["order"] = tuple(str(c) for c in _list(spec["order"], "spec: order"))
    if "query" in spec:
        q = _known(spec["query"], ("last", "fraction", "column"), "spec: query")
        out.update(query_last=int(q.get("last", 0)), query_fraction=float(q.get("fraction", 0.0)),
                   query_column=str(q.get("column", "")))
    if "labels" in spec:
        labels = _known(spec["labels"], LABEL_NAMES, "spec: labels")
        out["labels"] = tuple(Label.parse(k, v, "spec: labels") for k, v in labels.items())
    out_lists = {"join": ("joins", lambda d, w: _build(Join, d, w, required=("path", "on"))),
                 "derive": ("derive", lambda d, w: _build(Derive, d, w, required=("name", "column"))),
                 "sparse": ("sparse", _feature), "dense": ("dense", _dense)}
    for key, (name, make) in out_lists.items():
        if key in spec:
            out[name] = tuple(make(d, f"spec: {key}[{k}]") for k, d in enumerate(_list(spec[key], f"spec: {key}")))
    if "negatives" in spec:
        n = spec["negatives"]
        n = _known({"query": n} if isinstance(n, (int, float)) else n, ("query", "support"), "spec: negatives")
        try:
            out.update(negatives=int(n.get("query", 0)), support_negatives=float(n.get("support", 0.0)))
        except (TypeError, ValueError) as exc:
            raise SpecError(f"spec: negatives: {exc}") from None
    if "cold" in spec:
        cold = _known(spec["cold"], ("users", "items"), "spec: cold")
        out.update(cold_users=_cold(cold.get("users"), "spec: cold.users"),
                   cold_items=_cold(cold.get("items"), "spec: cold.items"))
    return out


# ---------------------------------------------------------------------------------- flags
def _pairs(values, flag: str) -> list:
    """``NAME=VALUE`` flags as (name, value) pairs."""
    out = []
    for v in values or ():
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise SpecError(f"{flag} {v!r}: expected NAME=VALUE")
        out.append((name.strip(), rest.strip()))
    return out


def flag_fields(args) -> dict:
    """The flags the user gave (None means not given) as ``TableConfig`` keyword arguments,
    merged over the spec's: lists of features are extended, features named twice replaced."""
    out = {}
    plain = {"src": "src", "format": "format", "task": "task", "task_kind": "task_kind",
             "timestamp_format": "timestamp_format", "query_column": "query_column", "split_column": "split_column",
             "query_last": "query_last", "query_fraction": "query_fraction", "min_events": "min_events",
             "max_events": "max_events", "min_count": "min_count", "val_fraction": "val_fraction", "seed": "seed",
             "vocab_from": "vocab_from", "memory_mb": "memory_mb", "partitions": "partitions", "tmp_dir": "tmp_dir",
             "csv_delimiter": "csv_delimiter", "negatives": "negatives", "support_negatives": "support_negatives"}
    for dest, name in plain.items():
        value = getattr(args, dest, None)
        if value is not None:
            out[name] = value
    if any(getattr(args, k, None) is not None for k in ("query_last", "query_fraction", "query_column")):
        out = {"query_last": 0, "query_fraction": 0.0, "query_column": "", **out}   # a flag replaces the rule
    if args.input:
        out["inputs"] = tuple(args.input)
    if args.order:
        out["order"] = tuple(c.strip() for c in args.order.split(",") if c.strip())
    if args.label:
        out["labels"] = tuple(Label.parse(n, e, "--label") for n, e in _pairs(args.label, "--label"))
    sparse = [Feature(c, c) for c in args.sparse or ()]
    sparse += [Feature(n, n, delimiter=d) for n, d in _pairs(args.list, "--list")]
    if sparse:
        out["sparse"] = tuple(sparse)
    if args.dense:
        out["dense"] = tuple(Dense(c, c) for c in args.dense)
    out["_hashed"] = tuple((n, int(b)) for n, b in _pairs(args.hashed, "--hashed"))
    out["_item"] = args.item or ""
    for side in ("users", "items"):
        after, frac = getattr(args, f"cold_{side}_after"), getattr(args, f"cold_{side}_fraction")
        if getattr(args, f"cold_{side}_random") and frac is None:
            raise SpecError(f"--cold-{side}-random draws --cold-{side}-fraction of them; give the fraction too")
        if after is not None or frac is not None:
            out[f"_cold_{side}"] = ColdRule(after=_number_or_text(after) if after is not None else None,
                                            fraction=frac or 0.0, random=bool(getattr(args, f"cold_{side}_random")))
    return out


def _number_or_text(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def _merge_features(base: tuple, extra: tuple) -> tuple:
    names = {f.name for f in extra}
    return tuple(f for f in base if f.name not in names) + tuple(extra)


def build_config(spec: dict, flags: dict, output: dict) -> TableConfig:
    """Defaults < spec < flags, then the flag-only adjustments (``--hashed``, ``--item``, cold
    rules) applied to the merged feature list; validated."""
    kw = spec_fields(spec)
    flags = dict(flags)
    hashed, item = flags.pop("_hashed", ()), flags.pop("_item", "")
    cold = {k: flags.pop(f"_cold_{k}") for k in ("users", "items") if f"_cold_{k}" in flags}
    for key in ("sparse", "dense"):
        if key in flags:
            flags[key] = _merge_features(kw.get(key, ()), flags[key])
    kw.update(flags)
    sparse = list(kw.get("sparse", ()))
    if item:
        known = [f for f in sparse if f.column == item and not f.delimiter]
        if not known:
            sparse.append(Feature(item, item, group="item"))
        kw["item_id_feature"] = known[0].name if known else item
    for name, buckets in hashed:
        found = [k for k, f in enumerate(sparse) if f.name == name]
        if not found:
            raise SpecError(f"--hashed {name}={buckets}: no sparse feature {name!r} (features: "
                            f"{[f.name for f in sparse]})")
        f = sparse[found[0]]
        sparse[found[0]] = replace(f, hashed=buckets)
    kw["sparse"] = tuple(sparse)
    for side, rule in cold.items():
        old = kw.get(f"cold_{side}", ColdRule())
        kw[f"cold_{side}"] = ColdRule(after=rule.after, fraction=rule.fraction, random=rule.random, column=old.column,
                                      by="" if rule.after is not None or rule.random else old.by)
    try:
        return TableConfig(**kw, **output).validate()
    except TypeError as exc:
        raise SpecError(f"spec: {exc}") from None


