"""ssh between the cluster's hosts, with nothing of the machine's own ssh set-up touched.

horovodrun starts each remote worker with ``ssh -o PasswordAuthentication=no -o
StrictHostKeyChecking=no HOST ...`` (horovod/runner/util/remote.py), found on PATH. The cluster
puts a directory first on PATH whose ``ssh`` runs the real one with ``-F`` the cluster's own
config: the cluster's client key, its own known-hosts file (so root's ~/.ssh is neither read nor
written) and keep-alives, so that a host that drops off the network ends its ssh session within
45 s instead of after TCP's retransmission timeout (about 15 minutes). The keep-alive is the
backstop, not the detector: Gloo's own timeout (``HOROVOD_GLOO_TIMEOUT_SECONDS``, 30 s) fails
the blocked collective first, so the surviving ranks fail with an error and mark the MLflow run
FAILED; an ssh session ended first would have horovodrun SIGTERM them (a stop: KILLED).

Each host runs ``sshd -D -f <its config>`` inside its namespace, listening on its own address
only, with a host key and an authorized key made for this cluster and deleted with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from gmeta.tools.cluster.netns import ClusterError

SSHD = "/usr/sbin/sshd"
#: seconds between keep-alives, and how many may go unanswered (client and server alike): longer
#: than Gloo's 30 s timeout (module docstring)
ALIVE_INTERVAL_S = 15
ALIVE_COUNT = 3


def ssh_binary() -> str | None:
    return shutil.which("ssh", path="/usr/bin:/bin:/usr/local/bin")


def make_keys(directory: str) -> None:
    """A host key and a client key (ed25519, no passphrase) in ``directory``."""
    keygen = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
    for name in ("host_key", "id_ed25519"):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            proc = subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "gmeta-cluster", "-f", path],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ClusterError(f"ssh-keygen failed: {proc.stderr.strip()}")
    shutil.copyfile(os.path.join(directory, "id_ed25519.pub"), os.path.join(directory, "authorized_keys"))
    os.chmod(os.path.join(directory, "authorized_keys"), 0o600)


def write_sshd_config(directory: str, host: str, address: str) -> str:
    """One host's sshd config: its address only, the cluster's keys, key login as root only."""
    path = os.path.join(directory, f"sshd_{host}.conf")
    with open(path, "w") as f:
        f.write(f"""# gmeta cluster: sshd of {host}
ListenAddress {address}
Port 22
HostKey {directory}/host_key
PidFile {directory}/sshd_{host}.pid
AuthorizedKeysFile {directory}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
PrintMotd no
UseDNS no
MaxStartups 100
MaxSessions 100
ClientAliveInterval {ALIVE_INTERVAL_S}
ClientAliveCountMax {ALIVE_COUNT}
LogLevel ERROR
""")
    return path


def write_client(directory: str, patterns: list) -> str:
    """The client config and the ``ssh`` wrapper (in ``directory/bin``); returns that bin dir."""
    config = os.path.join(directory, "ssh_config")
    with open(config, "w") as f:
        f.write(f"""# gmeta cluster: the ssh client's config (used through {directory}/bin/ssh only)
Host {' '.join(patterns)}
    User root
    IdentityFile {directory}/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile {directory}/known_hosts
    StrictHostKeyChecking no
    BatchMode yes
    LogLevel ERROR
    ConnectTimeout 10
    ServerAliveInterval {ALIVE_INTERVAL_S}
    ServerAliveCountMax {ALIVE_COUNT}
""")
    bindir = os.path.join(directory, "bin")
    os.makedirs(bindir, exist_ok=True)
    wrapper = os.path.join(bindir, "ssh")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\n# gmeta cluster: ssh with the cluster\'s own config (keys, known hosts)\n'
                f'exec {ssh_binary() or "/usr/bin/ssh"} -F {config} "$@"\n')
    os.chmod(wrapper, 0o755)
    return bindir


def start_sshd(ns: str, config: str, log_file: str) -> int:
    """Start sshd in namespace ``ns`` (in the foreground of its own process); wait until it
    listens. Returns its pid."""
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory (Debian)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, SSHD, "-D", "-f", config, "-E", log_file],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return proc.pid


def wait_listening(ns: str, address: str, pid: int, log_file: str, timeout_s: float = 10.0) -> None:
    """Until ``address:22`` accepts a connection inside ``ns``; ClusterError if sshd died."""
    deadline = time.monotonic() + timeout_s
    probe = ["ip", "netns", "exec", ns, "python3", "-c",
             f"import socket; socket.create_connection(('{address}', 22), timeout=1).close()"]
    while time.monotonic() < deadline:
        if not alive(pid):
            raise ClusterError(f"sshd in {ns} exited at start: {read_tail(log_file)}")
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise ClusterError(f"sshd in {ns} does not listen on {address}:22 after {timeout_s:g} s: {read_tail(log_file)}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (our own child not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ours(pid: int, config: str) -> bool:
    """True when ``pid`` is the sshd started with ``config`` (never signal a stranger's process)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return config.encode() in f.read()
    except OSError:
        return False


def stop(pid: int, config: str) -> None:
    """Stop the sshd (and its sessions' process group) started with ``config``."""
    if not ours(pid, config):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        pass
    for _ in range(50):
        if not alive(pid):
            break
        time.sleep(0.05)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.waitpid(pid, os.WNOHANG)
    except OSError:
        pass


def read_tail(path: str, limit: int = 400) -> str:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return "(no log)"
    return text[-limit:] or "(empty log)"
