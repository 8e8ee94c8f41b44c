"""Processes and collectives: ``comm`` (the Communicator; the only module that imports Horovod,
with a local twin for one process), ``launch`` (the guarded main every command runs under, the
one horovodrun command line and its environment), ``signals`` (clean stops on SIGTERM/SIGINT,
agreed by every rank) and ``faults`` (the named fault points tests trigger through
``GMETA_FAULTS``). Imports nothing else of gmeta.trainer."""
