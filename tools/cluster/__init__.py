"""A cluster of hosts on one machine, made of Linux network namespaces, to rehearse multi-host runs.

Multi-host training fails in ways one host never shows: ssh set-up, host names, which network
interface Gloo binds, paths one host cannot see, a peer that vanishes mid-collective. This package
makes N "hosts" on one Linux machine (root needed) so those paths run for real, in tests and for
a user rehearsing a launch (``gmeta cluster up|run|down|status``):

    netns.py     the network: one namespace per host, a bridge in its own namespace, veth links,
                 addresses in a private range that exists only inside the namespaces
    sshd.py      ssh: a throwaway host key and client key per cluster, one ``sshd -D`` per host
                 listening on that host's address, and the ``ssh`` wrapper horovodrun runs
    cluster.py   the whole: ``Cluster`` (up, down, run a command on the head host, a context
                 manager that tears down on failure and Ctrl-C), its state on disk, and
                 ``unavailable()``, the reason a machine cannot make one
    cli.py       ``gmeta cluster``

All hosts share the machine's filesystem, so a dataset, the virtualenv and checkpoint dirs are
visible from every host, as a shared mount would make them on a real cluster.
install_sshd.sh installs Debian's openssh-server (never starting the system service).
"""
