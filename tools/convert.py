"""``gmeta convert SOURCE``: turn a public dataset into the Meta-IO format (one module per source)."""

from __future__ import annotations

import importlib

CONVERTERS = {
    "movielens": "gmeta.tools.movielens",   # MovieLens-100K / -1M, MeLU protocol
    "table": "gmeta.tools.table.command",   # any event table (Parquet, ORC, CSV) described by a spec
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for name, module in CONVERTERS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0],
                           description=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_convert_module=module)


def main(args) -> int:
    return int(importlib.import_module(args._convert_module).main(args) or 0)
