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

Across hosts, a host that drops off the network leaves no error of its own: its ranks' output
cannot reach the launcher, and the other ranks only see their collectives time out (Gloo's
``HOROVOD_GLOO_TIMEOUT_SECONDS``, 30 s) and report "a collective was aborted". So when a job on
other hosts fails and no rank said why, each remote host of ``-H`` is probed (a TCP connection
to its ssh port, 5 s) and the last line names the host that does not answer, with its ranks.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
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
#: what a rank says when a peer failed first (gmeta.trainer.parallel.launch.one_line)
ABORTED = "a collective was aborted"
PROBE_TIMEOUT_S = 5.0


def add_arguments(p) -> None:
    # (no defaults shown: SUPPRESS keeps the help formatter from printing "default: None")
    p.add_argument("-np", dest="np", type=int, required=True, default=argparse.SUPPRESS, metavar="N",
                   help="number of worker processes")
    p.add_argument("-H", dest="hosts", default=argparse.SUPPRESS, metavar="HOST:SLOTS,...",
                   help="hosts and their slots, as horovodrun's -H; localhost:N when not given")
    p.add_argument("--network-interface", dest="network_interface", default=argparse.SUPPRESS, metavar="NIC",
                   help="across hosts: the interface Gloo uses, with this name on every host (horovodrun's "
                        "--network-interface); by default horovodrun probes for one all hosts share")
    p.add_argument("--ssh-port", dest="ssh_port", type=int, default=argparse.SUPPRESS, metavar="PORT",
                   help="ssh port on every host (horovodrun's -p)")
    p.add_argument("--ssh-identity-file", dest="ssh_identity_file", default=argparse.SUPPRESS, metavar="FILE",
                   help="the private key ssh uses (horovodrun's -i)")
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
        cmd = horovodrun_command(args.np, [sys.executable, "-m", "gmeta.cli", *args.argv], getattr(args, "hosts", None),
                                 network_interface=getattr(args, "network_interface", None),
                                 ssh_port=getattr(args, "ssh_port", None),
                                 ssh_identity_file=getattr(args, "ssh_identity_file", None))
    except FileNotFoundError as exc:
        print(f"gmeta launch: {exc}", file=sys.stderr)
        return 2
    hosts = getattr(args, "hosts", None)
    return run(cmd, ranks_by_host(hosts, args.np) if hosts else None, getattr(args, "ssh_port", None) or 22)


def ranks_by_host(hosts: str, np_: int) -> dict:
    """host -> its ranks, as horovodrun assigns them (``-H a:2,b:2``: a gets 0 and 1, b 2 and 3)."""
    out, rank = {}, 0
    for item in filter(None, hosts.split(",")):
        name, _, slots = item.strip().partition(":")
        for _ in range(int(slots or 1)):
            if rank < np_:
                out.setdefault(name, []).append(rank)
                rank += 1
    return out


def unreachable_hosts(ranks_of: dict, port: int) -> list:
    """The hosts of ``ranks_of`` that are not this machine and do not accept a TCP connection on
    ``port`` within PROBE_TIMEOUT_S, each with why."""
    found = []
    for host in ranks_of:
        if host in ("localhost", "127.0.0.1", socket.gethostname()):
            continue
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:
            found.append((host, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__))
    return found


def run(cmd, ranks_of: dict | None = None, ssh_port: int = 22) -> int:
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
    lost = ""
    if code != 0 and ranks_of and all(e.startswith(ABORTED) for e in rank_errors.values()):
        lost = "".join(f"gmeta launch: host {host} (rank{'s' if len(ranks_of[host]) > 1 else ''} "
                       f"{', '.join(map(str, ranks_of[host]))}) is unreachable ({why} on port {ssh_port}): the other "
                       f"ranks' collectives timed out waiting for it; bring it back or leave it out of -H, then "
                       f"--resume\n" for host, why in unreachable_hosts(ranks_of, ssh_port))
    sys.stderr.write((failure_line(held, rank_errors) or "".join(held)) + lost)
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
