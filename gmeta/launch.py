"""``gmeta launch``: horovodrun for a gmeta command, ending a failed job with the failing rank's error.

    gmeta launch -np 2 train --model melu --data DIR
    gmeta launch -np 8 -H host1:4,host2:4 train --model melu --data hdfs://.../DIR

It runs ``horovodrun -np N -H HOSTS --gloo <this Python> -m gmeta.cli COMMAND ...`` and passes
its output through as it comes, with one change. When a worker exits non-zero, horovodrun
(Horovod 0.28, ``horovod/runner/gloo_run.py``) ends by raising a RuntimeError of its own, printed
as a 25-line Python traceback after the rank's one-line ``[gmeta rank R] ERROR ...``. That
traceback says only which process failed first and its exit status; it is replaced by one line
that says the same and repeats that rank's own error, so the cause is the last line printed.
Any other failure of horovodrun itself is shown in full. The exit status is horovodrun's.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys

from gmeta.cli import SUBCOMMANDS, did_you_mean
from gmeta.trainer.parallel.launch import horovodrun_command

#: how horovodrun's own traceback starts, and the lines of its RuntimeError naming the first failure
TRACEBACK = "Traceback (most recent call last):"
WORKER_FAILED = "RuntimeError: Horovod detected that one or more processes exited with non-zero status"
FIRST_FAILED = re.compile(r"^Process name: (\S+)\s*$")
EXIT_CODE = re.compile(r"^Exit code: (-?\d+)\s*$")
#: a rank's report (gmeta.trainer.parallel.launch.run_guarded) as horovodrun prefixes it
RANK_ERROR = re.compile(r"^\[(\d+)\]<stderr>:\[gmeta rank \d+\] ERROR (.*)$")
RANK_LINE = re.compile(r"^\[\d+\]<std(out|err)>:")


def add_arguments(p) -> None:
    # (no defaults shown: SUPPRESS keeps the help formatter from printing "default: None")
    p.add_argument("-np", dest="np", type=int, required=True, default=argparse.SUPPRESS, metavar="N",
                   help="number of worker processes")
    p.add_argument("-H", dest="hosts", default=argparse.SUPPRESS, metavar="HOST:SLOTS,...",
                   help="hosts and their slots, as horovodrun's -H; localhost:N when not given")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="the gmeta command and its flags, e.g. train --model melu --data DIR")


def main(args) -> int:
    name = args.argv[0] if args.argv else ""
    problem = ("-np must be at least 1" if args.np < 1
               else "name the gmeta command to run, e.g. gmeta launch -np 2 train --model melu --data DIR"
               if not name
               else f"{name!r} is not a gmeta command{did_you_mean(name, SUBCOMMANDS)}" if name not in SUBCOMMANDS
               else "")
    if problem:
        print(f"gmeta launch: {problem}; see gmeta launch --help", file=sys.stderr)
        return 2
    try:
        cmd = horovodrun_command(args.np, [sys.executable, "-m", "gmeta.cli", *args.argv], getattr(args, "hosts", None))
    except FileNotFoundError as exc:
        print(f"gmeta launch: {exc}", file=sys.stderr)
        return 2
    return run(cmd)


def run(cmd) -> int:
    """Run horovodrun; stdout passes through untouched, stderr line by line (module docstring)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")

    def forward(signum, _frame):  # horovodrun stops its workers on either signal
        if proc.poll() is None:
            proc.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    rank_errors, held = {}, []
    for line in proc.stderr:
        if not RANK_LINE.match(line) and (held or line.startswith(TRACEBACK)):
            held.append(line)  # horovodrun's own traceback: judged once it is complete
            continue
        sys.stderr.write(line)
        sys.stderr.flush()
        m = RANK_ERROR.match(line.rstrip("\n"))
        if m:
            rank_errors.setdefault(m.group(1), m.group(2))
    code = proc.wait()
    sys.stderr.write(failure_line(held, rank_errors) or "".join(held))
    sys.stderr.flush()
    return code


def failure_line(held, rank_errors: dict) -> str:
    """One line for horovodrun's "a worker exited non-zero" traceback; "" for anything else."""
    text = [line.rstrip("\n") for line in held]
    if not any(line.startswith(WORKER_FAILED) for line in text):
        return ""
    rank = next((m.group(1) for m in map(FIRST_FAILED.match, text) if m), "?")
    status = next((m.group(1) for m in map(EXIT_CODE.match, text) if m), "?")
    said = rank_errors.get(rank)
    return (f"gmeta launch: rank {rank} failed first (exit status {status}): "
            + (f"{said}\n" if said else "its output is above\n"))
