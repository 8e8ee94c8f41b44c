"""Processes and collectives: ``comm`` (the Communicator; the only module that imports Horovod,
with a local twin for one process) and ``launch`` (the guarded main every command runs under, and
the one horovodrun command line). Imports nothing else of gmeta.trainer."""
