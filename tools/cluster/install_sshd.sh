#!/usr/bin/env bash
# Install Debian's openssh-server for the namespace cluster (gmeta cluster, tests/test_cluster.py).
#
# The cluster starts its own sshd per namespace (`sshd -D -f <its config>`), never the system
# service, so the package is installed with service starts refused (policy-rc.d exit 101) and any
# system sshd it started anyway is stopped. Does nothing when not root, when sshd is already
# there, or without apt-get: the cluster tests then skip and say why.
set -u
SSHD=/usr/sbin/sshd
[ -x "$SSHD" ] && exit 0
[ "$(id -u)" = 0 ] || { echo "install_sshd: not root; skipping (the cluster tests will skip)" >&2; exit 0; }
command -v apt-get >/dev/null 2>&1 || { echo "install_sshd: no apt-get; skipping" >&2; exit 0; }

POLICY=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY" && chmod 755 "$POLICY" && made_policy=1
fi
cleanup() { [ "$made_policy" = 1 ] && rm -f "$POLICY"; }
trap cleanup EXIT

echo "install_sshd: installing openssh-server (apt-get) for the namespace cluster tests" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends openssh-server >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    apt-get install -y -q --no-install-recommends openssh-server >/dev/null 2>&1 \
        || { echo "install_sshd: apt-get install openssh-server failed; the cluster tests will skip" >&2; exit 0; }
fi
# never leave a system sshd running (a container without systemd may have started one anyway)
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
fi
if [ -f /run/sshd.pid ]; then
    kill "$(cat /run/sshd.pid)" 2>/dev/null || true
fi
exit 0
