"""``gmeta cluster``: a cluster of namespace hosts on this machine, to rehearse a multi-host launch.

    gmeta cluster up --hosts 3 --slots 2     # prints the hosts, their addresses, -H and the interface
    gmeta cluster run -- gmeta launch -np 4 -H gmeta-h0:2,gmeta-h1:2 --network-interface gmeta0 \\
        train --model melu --data data/synth
    gmeta cluster status
    gmeta cluster down                       # idempotent; also cleans up after a crashed up

``run`` runs the command on the head host (the first) with the cluster's ssh on PATH; the exit
status is the command's. Needs root, iproute2 and openssh-server (tools/cluster/install_sshd.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from gmeta.tools.cluster.cluster import DEFAULT_PREFIX, DEFAULT_SUBNET, Cluster, default_state_dir, teardown
from gmeta.tools.cluster.netns import ClusterError


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="make the hosts (network namespaces with sshd) and print how to launch on them")
    up.add_argument("--hosts", type=int, default=2, help="number of hosts")
    up.add_argument("--slots", type=int, default=1, help="worker slots per host (in the -H string)")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="private address range, only inside the namespaces")
    run = sub.add_parser("run", help="run a command on the head host: gmeta cluster run -- COMMAND ...")
    run.add_argument("--host", type=int, default=0, help="the host to run on (0: the head)")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND ...")
    sub.add_parser("down", help="tear the hosts down (idempotent)")
    sub.add_parser("status", help="the hosts, their addresses and sshd, as JSON")
    for q in (up, run, sub.choices["down"], sub.choices["status"]):
        q.add_argument("--prefix", default=DEFAULT_PREFIX, help="name of the cluster: hosts are PREFIX-h0, ...")


def main(args) -> int:
    try:
        return ACTIONS[args.action](args)
    except ClusterError as exc:
        print(f"gmeta cluster {args.action}: {exc}", file=sys.stderr)
        return 1


def _up(args) -> int:
    if args.hosts < 1 or args.slots < 1:
        raise ClusterError("--hosts and --slots must be at least 1")
    t0 = time.monotonic()
    cluster = Cluster(args.hosts, args.slots, prefix=args.prefix, subnet=args.subnet).up()
    for h in cluster.hosts:
        print(f"{h.name}  {h.address}  slots {h.slots}")
    n = args.hosts * args.slots
    print(f"-H {cluster.host_string()}   --network-interface {cluster.interface}   "
          f"(up in {time.monotonic() - t0:.1f} s)")
    print(f"try: gmeta cluster run -- gmeta launch -np {n} -H {cluster.host_string()} "
          f"--network-interface {cluster.interface} train --model melu --data DIR")
    return 0


def _run(args) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ClusterError("name the command to run: gmeta cluster run -- COMMAND ...")
    cluster = Cluster.load(args.prefix)
    if not 0 <= args.host < len(cluster.hosts):
        raise ClusterError(f"--host {args.host}: the cluster has hosts 0..{len(cluster.hosts) - 1}")
    try:
        return cluster.run(argv, host=args.host).returncode
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        raise ClusterError(f"cannot run {argv[0]}: {exc}") from None


def _down(args) -> int:
    removed = teardown(args.prefix, default_state_dir(args.prefix))
    print(f"removed {', '.join(removed)}" if removed else "nothing to remove")
    return 0


def _status(args) -> int:
    print(json.dumps(Cluster.load(args.prefix).status(), indent=1))
    return 0


ACTIONS = {"up": _up, "run": _run, "down": _down, "status": _status}
