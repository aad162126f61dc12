"""The model host: a supervisor that loads the model once and serves it to forked workers.

``Supervisor`` (supervisor.py) is the composition root; each role has its own module:
``rundir`` (socket directory, lock, stale files), ``pool`` (worker processes and their
states), ``connections`` (admission and frames), ``dispatch`` (requests, queue, batches),
``reports`` (info and status). The queue's rules are in ``shm_model.scheduling`` (pure).
"""

from shm_model.host.supervisor import Supervisor, single_threaded

__all__ = ["Supervisor", "single_threaded"]
