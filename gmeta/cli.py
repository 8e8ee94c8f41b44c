"""The ``gmeta`` command: one subcommand per job, each in its own module.

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``. Modules are
imported lazily so ``gmeta --help`` and ``gmeta env`` stay fast and never initialise Horovod.
Flags are turned into one frozen config inside each ``main``; nothing below reads argparse.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "env": ("gmeta.tools.env", "print versions of the stack and Horovod's build capabilities"),
    "datagen": ("gmeta.tools.datagen.generate", "write a synthetic cold-start dataset with planted structure"),
    "profile": ("gmeta.tools.profile", "how skewed a dataset's id access is; writes the profile --tiering reads"),
    "convert": ("gmeta.tools.convert", "convert a public dataset (movielens) into the Meta-IO format"),
    "train": ("gmeta.trainer.train", "meta-train a zoo model (run under horovodrun for many workers)"),
    "tune": ("gmeta.trainer.tune", "hyper-parameter search (Optuna) on validation GAUC adapted; resumable"),
    "evaluate": ("gmeta.trainer.evaluate", "evaluate a logged run or a registered model on a dataset"),
    "compare": ("gmeta.trainer.compare", "compare runs in per-task metrics with intervals and paired tests"),
    "register": ("gmeta.trainer.register", "register a run's model in the MLflow registry, with an alias"),
    "predict": ("gmeta.trainer.predict", "adapt to each task's support rows and score its query rows (file in, file out)"),
    "bench": ("gmeta.tools.bench.cli", "benchmarks: io, step, meta, memory, projection, movielens, breakdown, hot, coldstart (see gmeta bench -h)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # TensorFlow's C++ start-up chatter hides the progress lines users need.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    full = build_parser_for(argv)
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


def build_parser_for(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # --epoch must not silently mean --epochs
        prog="gmeta",
        description="Distributed trainer for meta-learning recommendation models.")
    parser.add_argument("--version", action="store_true", help="print the gmeta version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = {a for a in argv if a in SUBCOMMANDS}
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_module=module)
        if name in wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


if __name__ == "__main__":
    sys.exit(main())
