"""The layout's rules, checked on the source: every package installed, imports at module top and
in layer order with no cycle, Horovod imported in one module, and one source of defaults."""

from __future__ import annotations

import ast
import configparser
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmeta.cli import build_parser_for
from gmeta.models.base import ModelConfig
from gmeta.trainer import COMMANDS, LAYERS
from gmeta.trainer.config import TrainConfig, config_from_args, part_configs
from gmeta.trainer.embedding.row_optim import RowOptimizerConfig
from gmeta.trainer.meta.learner import MetaConfig

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (setup.cfg's package_dir)
ROOTS = {"gmeta": "gmeta", "trainer": "gmeta.trainer", "models": "gmeta.models", "io": "gmeta.io",
         "tools": "gmeta.tools"}
#: what may be imported inside a function: heavy or optional libraries a module must load without
#: (the CLI's --help, the serving runtime, tools that run without TensorFlow)
LAZY_OK = ("tensorflow", "mlflow", "optuna", "matplotlib", "horovod", "sparse_operation_kit", "pandas")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("").parts
    return ".".join([ROOTS[rel[0]], *(p for p in rel[1:] if p != "__init__")])


def _sources() -> dict:
    return {_module_name(p): p for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))}


def _imports(node) -> list:
    """Module names an import statement loads (``from a import b``: ``a.b`` when it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def _top_level_imports(tree) -> list:
    """Imports that run when the module is imported (also under a top-level ``if``/``try``)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.If, ast.Try)):
            todo.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)
        found.extend(_imports(node))
    return found


@pytest.fixture(scope="module")
def graph() -> dict:
    """gmeta module -> the gmeta modules it imports at its top."""
    sources = _sources()
    edges = {}
    for name, path in sources.items():
        tree = ast.parse(path.read_text(), str(path))
        edges[name] = {m for m in _top_level_imports(tree) if m in sources and m != name}
    return edges


def test_setup_cfg_lists_every_package():
    """An editable install finds a package setup.cfg forgot; a wheel would not."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {_module_name(p.parent / "__init__.py") for root in ROOTS for p in (REPO / root).rglob("__init__.py")}
    assert on_disk - listed == set(), f"packages missing from setup.cfg: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"setup.cfg lists packages that do not exist: {sorted(listed - on_disk)}"


def test_module_imports_have_no_cycle(graph):
    """A cycle only works by accident of import order (and hid behind imports inside functions)."""
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _part(module: str) -> str | None:
    """The trainer package (layer) or command a module belongs to."""
    parts = module.split(".")
    if parts[:2] != ["gmeta", "trainer"] or len(parts) < 3:
        return None
    return parts[2]


def test_trainer_packages_import_only_lower_layers(graph):
    """``gmeta.trainer.LAYERS`` is the order its docstring describes; commands sit on top."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    rank.update({name: len(LAYERS) for name in COMMANDS})
    on_disk = {_part(m) for m in graph if _part(m)}
    assert on_disk == set(rank), f"trainer parts not in LAYERS or COMMANDS: {sorted(on_disk ^ set(rank))}"
    wrong = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                   if _part(a) and _part(b) and _part(a) != _part(b)
                   and not (rank[_part(b)] < rank[_part(a)] or _part(a) in COMMANDS))
    assert wrong == []


def test_imports_inside_functions_are_only_heavy_optional_libraries():
    """Imports at module top show the dependency graph; only libraries a module must load without
    may wait (the CLI loads each command module by name, on purpose)."""
    late = []
    for name, path in _sources().items():
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    late += [f"{name}: {m}" for m in _imports(node)
                             if m.split(".")[0] not in LAZY_OK and m != "gmeta.__version__" and m != "gmeta"]
    assert late == []


def test_only_comm_imports_horovod():
    hits = sorted(name for name, path in _sources().items()
                  if any(m.split(".")[0] == "horovod"
                         for node in ast.walk(ast.parse(path.read_text())) for m in _imports(node)))
    assert hits == ["gmeta.trainer.parallel.comm"]


def test_every_module_imports_in_a_fresh_interpreter():
    """One interpreter imports every module (the test above proves the order does not matter)."""
    names = sorted(_sources())
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok', len(sys.argv) - 1)"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", str(len(names))]


def test_defaults_are_declared_once_and_reach_every_part(monkeypatch):
    """The CLI's defaults are TrainConfig's, and each part's config receives the run's values: a
    part built in code trains what the command line trains. (The tracking flags' defaults come
    from MLflow's variables when set, by design; MLflow sets one in-process, so they are cleared.)"""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser_for(["train"]).parse_args(["train", "--model", "melu", "--data", "d"])
    cfg = config_from_args(args)
    assert cfg == TrainConfig(model="melu", data="d").validate()
    for part in (ModelConfig, MetaConfig, RowOptimizerConfig):
        mirrored = [f.name for f in dataclasses.fields(part)
                    if f.name in {g.name for g in dataclasses.fields(TrainConfig)}]
        no_default = [f.name for f in dataclasses.fields(part) if f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING]
        assert set(mirrored) <= set(no_default), f"{part.__name__} declares defaults of run settings"
    model_cfg, meta_cfg, row_cfg = part_configs(cfg)
    by_part = {model_cfg: {"plain_weight": None}, meta_cfg: {"plain_weight": "plain_loss_weight"},
               row_cfg: {"kind": "emb_optimizer", "learning_rate": "emb_lr"}}
    for part, renamed in by_part.items():
        for f in dataclasses.fields(part):
            source = renamed.get(f.name, f.name)
            if source and hasattr(cfg, source):
                got, want = getattr(part, f.name), getattr(cfg, source)
                if f.name == "meta_sgd":
                    want = want and cfg.meta == "maml"
                assert got == (tuple(want) if isinstance(got, tuple) else want), f"{type(part).__name__}.{f.name}"
