"""The ``gmeta`` command: one subcommand per job, each in its own module.

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``. Modules are
imported lazily so ``gmeta --help`` and ``gmeta env`` stay fast and never initialise Horovod.
Flags are turned into one frozen config inside each ``main``; nothing below reads argparse.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from gmeta.trainer.parallel.launch import worker_threads

# name -> (module, one-line help)
SUBCOMMANDS = {
    "env": ("gmeta.tools.env", "print versions of the stack and Horovod's build capabilities"),
    "datagen": ("gmeta.tools.datagen.generate", "write a synthetic cold-start dataset with planted structure"),
    "profile": ("gmeta.tools.profile", "how skewed a dataset's id access is; writes the profile --tiering reads"),
    "convert": ("gmeta.tools.convert", "convert MovieLens or any event table (Parquet, ORC, CSV; a spec file) into the Meta-IO format"),
    "train": ("gmeta.trainer.train", "meta-train a zoo model (run under horovodrun for many workers)"),
    "tune": ("gmeta.trainer.tune", "hyper-parameter search (Optuna) on validation GAUC adapted; resumable"),
    "evaluate": ("gmeta.trainer.evaluate", "evaluate a logged run or a registered model on a dataset"),
    "compare": ("gmeta.trainer.compare", "compare runs in per-task metrics with intervals and paired tests"),
    "register": ("gmeta.trainer.register", "register a run's model in the MLflow registry, with an alias"),
    "promote": ("gmeta.trainer.promote", "score a run against the champion on the same tasks; move the alias if it wins"),
    "predict": ("gmeta.trainer.predict", "adapt to each task's support rows and score its query rows (file in, file out)"),
    "bench": ("gmeta.tools.bench.cli", "benchmarks: io, step, meta, memory, projection, movielens, breakdown, hot, coldstart, scaling (see gmeta bench -h)"),
    "launch": ("gmeta.launch", "horovodrun for a gmeta command, ending a failed job with its rank's error"),
    "cluster": ("gmeta.tools.cluster.cli", "a cluster of network-namespace hosts on this machine (root): up, run, down, status"),
}


class Parser(argparse.ArgumentParser):
    """argparse with errors a user can act on: one line naming the (sub)command, the closest
    flag to a misspelled one, and where the help is, instead of the whole usage. Subcommand
    parsers are of this class too (argparse makes them of their parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --epoch must not silently mean --epochs
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = chosen_parser(self, parsed)
            parser.error(unknown_arguments(parser, extras))
        return parsed


def chosen_parser(parser: argparse.ArgumentParser, parsed) -> argparse.ArgumentParser:
    """The parser of the command the user typed (``gmeta``, ``gmeta train``, ``gmeta bench io``):
    unknown flags are reported by the top parser, but belong to the innermost subcommand."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(parsed, sub.dest, None) if sub is not None else None
        if name not in (sub.choices if sub is not None else {}):
            return parser
        parser = sub.choices[name]


def unknown_arguments(parser: argparse.ArgumentParser, extras) -> str:
    """``unknown flag --epoch (did you mean --epochs?)``; a flag's value is not reported apart."""
    flags = [a.split("=", 1)[0] for a in extras if a.startswith("--") or (a.startswith("-") and a[1:2].isalpha())]
    if not flags:
        return f"unexpected argument{'s' if len(extras) > 1 else ''} {' '.join(map(repr, extras))}"
    known = [o for action in parser._actions for o in action.option_strings]
    return f"unknown flag{'s' if len(flags) > 1 else ''} " + ", ".join(
        f"{flag}{did_you_mean(flag, known)}" for flag in flags)


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # TensorFlow's C++ start-up chatter hides the progress lines users need.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # MLflow's INFO lines (database set-up, system metrics, input-example checks) likewise; its
    # warnings still show. Either variable set by the user wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Workers sharing a host split its cores (set before TensorFlow starts its thread pools).
    os.environ.update(worker_threads(os.environ, len(os.sched_getaffinity(0))))
    full = build_parser_for(argv)
    command = command_of(argv)
    if command is not None and command not in SUBCOMMANDS:
        full.error(f"unknown command {command!r}{did_you_mean(command, SUBCOMMANDS)}")
    args = full.parse_args(argv)
    if args.version:
        from gmeta import __version__
        print(__version__)
        return 0
    if not getattr(args, "command", None):
        full.print_help()
        return 2
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


def command_of(argv):
    """The subcommand named on the command line (the first word that is not a flag: ``gmeta``
    itself takes no flag with a value), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser_for(argv) -> Parser:
    parser = Parser(prog="gmeta", description="Distributed trainer for meta-learning recommendation models.")
    parser.add_argument("--version", action="store_true", help="print the gmeta version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = command_of(argv)  # only its module is imported (the rest may pull in TensorFlow)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_module=module)
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


if __name__ == "__main__":
    sys.exit(main())
