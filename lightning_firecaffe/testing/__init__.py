"""Harnesses for tests, benchmarks and demos, not needed to train (standard library at import time).

* :mod:`.ranks`: start N local ranks (fork + gloo) or a Lightning script that launches its own ranks,
  always with a deadline; the one free-port helper.
* :mod:`.cluster`: an emulated cluster (network namespaces, shaped links; root only).
* :mod:`.slurm`: a private one-node SLURM (munge, MariaDB, slurmdbd, slurmctld, slurmd).
"""
