"""gmeta: a distributed trainer for optimization-based meta-learning recommenders.

The package is assembled from the repository's top-level folders (see setup.cfg):
``gmeta.trainer`` (trainer/), ``gmeta.models`` (models/), ``gmeta.io`` (io/), ``gmeta.tools`` (tools/).
"""

__version__ = "0.1.0"
