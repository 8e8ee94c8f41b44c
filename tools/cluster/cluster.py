"""``Cluster``: N namespace hosts with sshd, made and torn down as one, its state kept on disk.

The state (``DIR/state.json``, DIR ``/tmp/gmeta-cluster-<prefix>`` unless given) lets ``down``
run from another process than ``up`` (the CLI), and lets ``down`` clean up after an ``up`` that
crashed halfway: it removes every namespace named ``<prefix>-*`` and stops every process still
inside them, whether or not the state file got written. As a context manager a cluster is torn
down however the block ends (an exception, Ctrl-C).

Commands run on the head host, ``<prefix>-h0``, as a user logged into the first node would run
them: horovodrun there reaches the other hosts over ssh, and its rendezvous address and Gloo's
interface are the head host's ``IFACE``, which every host has.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from gmeta.tools.cluster import netns, sshd
from gmeta.tools.cluster.netns import IFACE, ClusterError

DEFAULT_PREFIX = "gmeta"
DEFAULT_SUBNET = "10.77.0.0/24"


def unavailable() -> str:
    """Why this machine cannot make a namespace cluster ("" when it can). Probes for real:
    adds and deletes a namespace."""
    if os.name != "posix" or not os.path.isdir("/proc"):
        return "namespace clusters need Linux"
    if os.geteuid() != 0:
        return "namespace clusters need root (ip netns add)"
    if not (shutil.which("ip") or os.path.exists("/usr/sbin/ip")):
        return "the ip command (iproute2) is not installed"
    if not os.path.exists(sshd.SSHD):
        return f"{sshd.SSHD} is missing: run tools/cluster/install_sshd.sh (apt-get install openssh-server)"
    if not sshd.ssh_binary() or not shutil.which("ssh-keygen"):
        return "the ssh client (openssh-client) is not installed"
    probe = f"gmeta-probe-{os.getpid()}"
    try:
        netns.ip("netns", "add", probe)
    except ClusterError as exc:
        return f"cannot create a network namespace: {exc}"
    netns.ip("netns", "delete", probe, check=False)
    return ""


@dataclass
class Host:
    name: str        # the host name (also its namespace's name), resolvable inside the cluster
    address: str
    slots: int


@dataclass
class Cluster:
    hosts_count: int = 2
    slots: int = 1
    prefix: str = DEFAULT_PREFIX
    subnet: str = DEFAULT_SUBNET
    state_dir: str = ""
    hosts: list = field(default_factory=list)
    sshd_pids: dict = field(default_factory=dict)
    up_seconds: float = 0.0

    def __post_init__(self):
        self.state_dir = self.state_dir or default_state_dir(self.prefix)

    # ---- what a launch needs ----
    @property
    def net_ns(self) -> str:
        return f"{self.prefix}-net"

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def interface(self) -> str:
        return IFACE

    def host_string(self, slots: int | None = None) -> str:
        """horovodrun's ``-H``: ``gmeta-h0:2,gmeta-h1:2``."""
        return ",".join(f"{h.name}:{slots or h.slots}" for h in self.hosts)

    @property
    def bin_dir(self) -> str:
        return os.path.join(self.state_dir, "bin")

    def env(self, base: dict | None = None) -> dict:
        """The environment of a command run on the cluster: the ssh wrapper first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = self.bin_dir + os.pathsep + env.get("PATH", "")
        env["GMETA_CLUSTER_INTERFACE"] = IFACE
        env["GMETA_CLUSTER_HOSTS"] = self.host_string()
        return env

    def command(self, argv, host: int = 0) -> list:
        """``argv`` as run on host ``host`` (the head by default)."""
        return ["ip", "netns", "exec", self.hosts[host].name, *map(str, argv)]

    def run(self, argv, host: int = 0, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` on a host (``subprocess.run``'s keywords pass through)."""
        return subprocess.run(self.command(argv, host), env=self.env(env), **kwargs)

    def popen(self, argv, host: int = 0, env: dict | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv, host), env=self.env(env), **kwargs)

    def cut(self, host: int) -> None:
        """Pull host ``host``'s cable: its link at the bridge goes down."""
        netns.set_link(self.net_ns, host, up=False)

    def reconnect(self, host: int) -> None:
        netns.set_link(self.net_ns, host, up=True)

    # ---- up / down ----
    def up(self) -> "Cluster":
        """Make the network and start sshd on every host; on any failure tear down what was made."""
        reason = unavailable()
        if reason:
            raise ClusterError(reason)
        start = time.monotonic()
        teardown(self.prefix, self.state_dir)  # the leftovers of a crashed earlier cluster
        os.makedirs(self.state_dir, mode=0o700)
        try:
            bridge_addr, addrs, prefixlen = netns.addresses(self.subnet, self.hosts_count)
            self.hosts = [Host(f"{self.prefix}-h{i}", a, self.slots) for i, a in enumerate(addrs)]
            self._save()  # first, so that down finds a half-made cluster too
            netns.make_network(self.net_ns, [h.name for h in self.hosts], addrs, prefixlen)
            entries = [(h.name, h.address) for h in self.hosts]
            for h in self.hosts:
                netns.write_hosts_file(h.name, entries, h.address)
            sshd.make_keys(self.state_dir)
            sshd.write_client(self.state_dir, [f"{self.prefix}-h*", *addrs])
            for h in self.hosts:
                config = sshd.write_sshd_config(self.state_dir, h.name, h.address)
                log = os.path.join(self.state_dir, f"sshd_{h.name}.log")
                self.sshd_pids[h.name] = sshd.start_sshd(h.name, config, log)
                self._save()
            for h in self.hosts:
                sshd.wait_listening(h.name, h.address, self.sshd_pids[h.name],
                                    os.path.join(self.state_dir, f"sshd_{h.name}.log"))
            self._check_ssh()
        except BaseException:
            self.down()
            raise
        self.up_seconds = time.monotonic() - start
        self._save()
        return self

    def _check_ssh(self) -> None:
        """ssh from the head host to every host, as horovodrun will."""
        for h in self.hosts:
            proc = self.run(["ssh", h.name, "true"], capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                raise ClusterError(f"ssh {self.head.name} -> {h.name} failed: {proc.stderr.strip()}")

    def down(self) -> None:
        teardown(self.prefix, self.state_dir)

    def __enter__(self) -> "Cluster":
        # Ctrl-C, or a test runner's SIGTERM, must still reach __exit__ (SIGTERM's default kills at once)
        self._old_term = signal.getsignal(signal.SIGTERM) if _main_thread() else None
        if self._old_term is not None and self._old_term in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _raise_interrupt)
        return self.up()

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            if self._old_term is not None and self._old_term in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    # ---- state ----
    def _save(self) -> None:
        state = {"prefix": self.prefix, "subnet": self.subnet, "slots": self.slots, "interface": IFACE,
                 "hosts": [vars(h) for h in self.hosts], "sshd_pids": self.sshd_pids,
                 "up_seconds": round(self.up_seconds, 2), "net_ns": self.net_ns}
        tmp = os.path.join(self.state_dir, "state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, os.path.join(self.state_dir, "state.json"))

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, state_dir: str = "") -> "Cluster":
        """The cluster ``up`` made (from its state file); ClusterError when there is none."""
        directory = state_dir or default_state_dir(prefix)
        try:
            with open(os.path.join(directory, "state.json")) as f:
                state = json.load(f)
        except (OSError, ValueError):
            raise ClusterError(f"no cluster is up (no state in {directory}); start one with gmeta cluster up") from None
        hosts = [Host(**h) for h in state["hosts"]]
        cluster = cls(len(hosts), state["slots"], state["prefix"], state["subnet"], directory, hosts,
                      state["sshd_pids"], state.get("up_seconds", 0.0))
        missing = [h.name for h in hosts if h.name not in netns.namespaces()]
        if missing:
            raise ClusterError(f"the cluster in {directory} is broken (namespaces {', '.join(missing)} are gone); "
                               f"run gmeta cluster down, then up")
        return cluster

    def status(self) -> dict:
        return {"hosts": [dict(vars(h), sshd=sshd.alive(self.sshd_pids.get(h.name, -1))) for h in self.hosts],
                "H": self.host_string(), "interface": IFACE, "head": self.head.name, "state_dir": self.state_dir}


def default_state_dir(prefix: str) -> str:
    return os.path.join("/tmp", f"gmeta-cluster-{prefix}")


def teardown(prefix: str, state_dir: str) -> list:
    """Remove every trace of the cluster ``prefix``: the processes in its namespaces (sshd, the
    workers it started, a command run there), the namespaces with their links and /etc/netns
    files, the state directory. Idempotent. Returns what it removed."""
    removed = []
    try:
        with open(os.path.join(state_dir, "state.json")) as f:
            pids = json.load(f).get("sshd_pids", {})
    except (OSError, ValueError):
        pids = {}
    for name, pid in pids.items():
        sshd.stop(int(pid), os.path.join(state_dir, f"sshd_{name}.conf"))
    ours = [ns for ns in netns.namespaces() if ns.startswith(f"{prefix}-h") or ns == f"{prefix}-net"]
    for ns in ours:
        _kill_namespace_processes(ns)
    for ns in ours:
        netns.remove_namespace(ns)
        removed.append(ns)
    for leftover in _etc_netns(prefix):  # files of namespaces that are gone already
        netns.remove_namespace(leftover)
    if os.path.isdir(state_dir):
        shutil.rmtree(state_dir, ignore_errors=True)
        removed.append(state_dir)
    return removed


def _etc_netns(prefix: str) -> list:
    try:
        return [n for n in os.listdir(netns.NETNS_ETC) if n.startswith(f"{prefix}-")]
    except OSError:
        return []


def _kill_namespace_processes(ns: str) -> None:
    """SIGTERM, then SIGKILL, every process inside namespace ``ns`` (all of them the cluster's)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in netns.ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        for _ in range(40):
            if not any(sshd.alive(p) for p in pids):
                break
            time.sleep(0.05)
        for pid in pids:  # reap our own children
            try:
                os.waitpid(pid, os.WNOHANG)
            except OSError:
                pass


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")
