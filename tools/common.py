"""What the dataset-producing commands (``gmeta datagen``, ``gmeta convert ...``) share: their
output flags and how they are checked, preparing the output directory, and a numpy helper."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from gmeta.io import fs
from gmeta.io.writer import COMPRESSIONS
from gmeta.trainer.parallel.launch import horovodrun_command, horovodrun_env, run_guarded


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """Where and how a command writes its dataset."""

    out: str
    rows_per_stripe: int = 8192
    compression: str = "zstd"
    overwrite: bool = False
    quiet: bool = False

    def output_checks(self, largest_task: int, largest_flags: str) -> dict:
        """``(ok, flag, what, value)`` per output flag, for ``check_flags`` in the command's order."""
        return {
            "--out": (bool(self.out), "--out", "must name a directory", repr(self.out)),
            "--rows-per-stripe": (self.rows_per_stripe >= largest_task, "--rows-per-stripe",
                                  f"must hold the largest task ({largest_flags} = {largest_task})",
                                  self.rows_per_stripe),
            "--compression": (self.compression in COMPRESSIONS, "--compression", f"must be one of {COMPRESSIONS}",
                              repr(self.compression)),
        }


class Progress:
    """Rows done and rows/s of the current part (a split, a pass) on stderr, at most every
    ``every`` seconds; ``force`` prints the part's last line, which is its row count. ``extra()``
    adds to each line (e.g. the peak memory)."""

    def __init__(self, prog: str, quiet: bool, every: float = 2.0, unit: str = "rows", width: int = 15,
                 extra=lambda: ""):
        self.prog, self.quiet, self.every, self.unit, self.width, self.extra = prog, quiet, every, unit, width, extra
        self.t0 = self.last = time.perf_counter()
        self.rows = 0

    def begin(self) -> None:
        """A new part: its own count and rate."""
        self.rows, self.t0 = 0, time.perf_counter()

    def tick(self, what: str, rows: int, force: bool = False) -> None:
        self.rows += rows
        now = time.perf_counter()
        if self.quiet or not (force or now - self.last >= self.every):
            return
        self.last = now
        rate = self.rows / max(now - self.t0, 1e-9)
        print(f"{self.prog}: {what:<{self.width}} {self.rows:>12,} {self.unit}  {rate:>12,.0f} rows/s{self.extra()}",
              file=sys.stderr, flush=True)


def run_command(name: str, make_config, args, run, error, format_summary, summary_file: str) -> int:
    """``gmeta NAME``'s main: its config from the parsed flags (``make_config``: a config class
    whose fields are the flags' dests, or a function of the flags), validated, then ``run(cfg)``.
    ``error`` (a bad flag or input; a class or a tuple) is printed, exit status 2."""
    try:
        if isinstance(make_config, type):
            cfg = make_config(**{f.name: getattr(args, f.name) for f in fields(make_config)}).validate()
        else:
            cfg = make_config(args)
        summary = run(cfg)
    except error as exc:
        print(f"gmeta {name}: error: {exc}", file=sys.stderr)
        return 2
    if not cfg.quiet:
        print(format_summary(summary))
        print(f"wrote {os.path.join(cfg.out, 'schema.json')} and {summary_file}")
    return 0


def check_flags(checks, error) -> None:
    """Raise ``error("FLAG WHAT (got VALUE)")`` for the first failed ``(ok, flag, what, value)``."""
    for ok, flag, what, value in checks:
        if not ok:
            raise error(f"{flag} {what} (got {value})")


def add_output_arguments(parser, defaults: OutputConfig, quiet_help: str) -> None:
    """The output flags every dataset-producing command takes (``--out`` is added by the command)."""
    a = parser.add_argument
    a("--rows-per-stripe", type=int, default=defaults.rows_per_stripe,
      help="ORC stripe size in rows (default: %(default)s)")
    a("--compression", default=defaults.compression,
      help=f"ORC compression: {', '.join(COMPRESSIONS)} (default: %(default)s)")
    a("--overwrite", action="store_true", help="replace an existing dataset in --out")
    a("--quiet", action="store_true", help=quiet_help)


def prepare_out(out: str, overwrite: bool, names, error=ValueError) -> None:
    """Refuse to mix with an existing dataset unless ``overwrite``; then remove only ``names``
    (our own outputs) from ``out``, leaving anything else there alone."""
    kinds = fs.pafs.FileType
    info = fs.file_info(out)
    if info.type == kinds.NotFound:
        return
    if info.type != kinds.Directory:
        raise error(f"--out {out!r} exists and is not a directory")
    present = [e for e in fs.list_dir(out) if e.base_name in names]
    if present and not overwrite:
        raise error(f"--out {out!r} already holds {[e.base_name for e in present]}; "
                    f"pass --overwrite to replace them")
    for e in present:
        filesystem, inner = fs.resolve(fs.join(out, e.base_name))
        if e.type == kinds.Directory:
            filesystem.delete_dir(inner)
        else:
            filesystem.delete_file(inner)


def group_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0-1, 0..c1-1, ...] for counts [c0, c1, ...]."""
    starts = np.cumsum(counts) - counts
    return np.arange(counts.sum()) - np.repeat(starts, counts)


def worker_main(prog: str, worker, make_config=lambda settings: settings) -> None:
    """The ``__main__`` of a benchmark's horovodrun worker: ``--worker DIR --config JSON``, the
    body run under the trainer's failure guard (a failing rank ends the whole job)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--worker", required=True, help="(internal) output folder of a worker run")
    parser.add_argument("--config", required=True, help="(internal) the benchmark's settings as JSON")
    a = parser.parse_args()
    sys.exit(run_guarded(worker, a.worker, make_config(json.loads(a.config))))


def launch_bench(name: str, module: str, np_: int, out_dir: str, config: dict, timeout: int) -> list:
    """Run ``module``'s worker under ``horovodrun -np np_ --gloo`` on localhost (its ``__main__``
    is ``worker_main``) and return every rank's ``rank{r}.json``; a failure or timeout is a
    SystemExit naming the benchmark, with the workers' last output."""
    try:
        cmd = horovodrun_command(np_, [sys.executable, "-m", module, "--worker", out_dir, "--config",
                                       json.dumps(config)])
    except FileNotFoundError as exc:
        raise SystemExit(f"gmeta bench {name}: {exc}") from None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=horovodrun_env(one_thread=True))
    except subprocess.TimeoutExpired:
        raise SystemExit(f"gmeta bench {name}: no result from -np {np_} within --timeout {timeout} s") from None
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"gmeta bench {name}: horovodrun -np {np_} failed ({proc.returncode})")
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(np_)]
