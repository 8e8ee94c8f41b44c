"""The cluster's network: a namespace per host, joined by a bridge that lives in a namespace of
its own, so nothing of it (addresses, routes, links) appears in the machine's own namespace.

Every host sees one interface, ``IFACE``, with the same name on every host: Horovod tells each
worker the interface to bind Gloo to by name (``HOROVOD_GLOO_IFACE``), so on a real cluster too
the interface named with ``--network-interface`` must exist on every host. The far end of each
host's link sits on the bridge as ``v<i>``; ``set_link(..., up=False)`` there cuts the host off
the network (a pulled cable: packets vanish, no connection is reset).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess

#: the interface each host sees (the same name on every host)
IFACE = "gmeta0"
#: the bridge, in the cluster's own network namespace
BRIDGE = "gmeta-br"
#: where ``ip netns exec NS`` takes per-namespace files from (bind-mounted over /etc/...)
NETNS_ETC = "/etc/netns"


class ClusterError(RuntimeError):
    """The cluster cannot be made or used here; the message says why."""


def ip(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; a failure raises ClusterError with ip's own message."""
    exe = shutil.which("ip") or "/usr/sbin/ip"
    proc = subprocess.run([exe, *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"ip {' '.join(map(str, args))}: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    return proc


def namespaces() -> list:
    """The names of the machine's network namespaces."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def addresses(subnet: str, count: int) -> tuple:
    """The bridge's address and ``count`` host addresses in ``subnet`` (hosts from .2), with the
    prefix length: ``("10.77.0.1", ["10.77.0.2", ...], 24)``."""
    net = ipaddress.ip_network(subnet, strict=True)
    pool = list(net.hosts())
    if len(pool) < count + 1:
        raise ClusterError(f"subnet {subnet} has room for {len(pool) - 1} hosts, not {count}")
    return str(pool[0]), [str(a) for a in pool[1:count + 1]], net.prefixlen


def make_network(net_ns: str, host_ns: list, host_addrs: list, prefixlen: int) -> None:
    """The bridge namespace ``net_ns`` with bridge ``BRIDGE``, and each host namespace linked to it."""
    ip("netns", "add", net_ns)
    ip("-n", net_ns, "link", "set", "lo", "up")
    ip("-n", net_ns, "link", "add", "name", BRIDGE, "type", "bridge")
    ip("-n", net_ns, "link", "set", BRIDGE, "up")
    for i, (ns, addr) in enumerate(zip(host_ns, host_addrs)):
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", net_ns, "link", "add", f"v{i}", "type", "veth", "peer", "name", IFACE, "netns", ns)
        ip("-n", net_ns, "link", "set", f"v{i}", "master", BRIDGE)
        ip("-n", net_ns, "link", "set", f"v{i}", "up")
        ip("-n", ns, "addr", "add", f"{addr}/{prefixlen}", "dev", IFACE)
        ip("-n", ns, "link", "set", IFACE, "up")


def set_link(net_ns: str, index: int, up: bool) -> None:
    """Connect (``up``) or cut host ``index``'s link at the bridge."""
    ip("-n", net_ns, "link", "set", f"v{index}", "up" if up else "down")


def write_hosts_file(ns: str, entries: list, own_address: str) -> str:
    """``/etc/netns/NS/hosts``, which ``ip netns exec NS`` shows as /etc/hosts to everything run
    in that host (the machine's own /etc/hosts is never changed): the cluster's names, then the
    machine's /etc/hosts without the machine's host name.

    The machine's host name comes first, as this host's address: Horovod 0.28 builds the Gloo
    context of its process sets (every job has one, the global set) with an empty interface
    (``InitializeForProcessSet`` reads its own, unset, ``gloo_iface_``), so Gloo binds the
    address the host name resolves to, ignoring ``--network-interface``; a name that resolves to
    a loopback address (Docker's and Debian's default /etc/hosts) makes every cross-host job fail
    with ``connect [127.0.x.1]:PORT: Connection refused``. Returns the path."""
    directory = os.path.join(NETNS_ETC, ns)
    os.makedirs(directory, exist_ok=True)
    try:
        with open("/etc/hosts") as f:
            base = f.read()
    except OSError:
        base = "127.0.0.1 localhost\n"
    me = socket.gethostname()
    ours = f"{own_address} {me}\n" + "".join(f"{addr} {name}\n" for name, addr in entries)
    base = "".join(_without_name(line, me) for line in base.splitlines(keepends=True))
    path = os.path.join(directory, "hosts")
    with open(path, "w") as f:
        f.write("# gmeta cluster: this host's name and the cluster's hosts (first match wins)\n" + ours
                + "# the machine's /etc/hosts\n" + base)
    return path


def _without_name(line: str, name: str) -> str:
    """A hosts-file line without ``name`` (getaddrinfo returns every address a name has, the
    loopback one first); a line left with no name is commented out."""
    fields = line.split("#", 1)[0].split()
    if len(fields) < 2 or name not in fields[1:]:
        return line
    kept = [f for f in fields[1:] if f != name]
    return f"{fields[0]} {' '.join(kept)}\n" if kept else f"# {line.rstrip()}  (gmeta cluster: {name} is above)\n"


def remove_namespace(ns: str) -> None:
    """Delete a namespace (its links go with it) and its /etc/netns files; absent is fine."""
    if ns in namespaces():
        ip("netns", "delete", ns, check=False)
    shutil.rmtree(os.path.join(NETNS_ETC, ns), ignore_errors=True)
    try:
        os.rmdir(NETNS_ETC)  # only when empty: other namespaces' files stay
    except OSError:
        pass
