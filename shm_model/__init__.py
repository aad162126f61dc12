"""shm-model: one copy of a sentence-embedding model, shared by every process that needs it.

Public API::

    from shm_model import HostClient            # encode through a running host
    from shm_model import errors                # typed errors (also re-exported here)

The client is imported lazily so that ``import shm_model`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shm_model.errors import (
    BadRequest,
    ConfigError,
    HostUnavailable,
    InternalError,
    ModelLoadError,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    ShmModelError,
    WorkerCrashed,
)

if TYPE_CHECKING:
    from shm_model.client import HostClient, wait_for_host

__version__ = "0.1.0"

_LAZY = {"HostClient": "shm_model.client", "wait_for_host": "shm_model.client"}

__all__ = [
    "BadRequest",
    "ConfigError",
    "HostClient",
    "HostUnavailable",
    "InternalError",
    "ModelLoadError",
    "Overloaded",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "RequestTimeout",
    "ShmModelError",
    "WorkerCrashed",
    "wait_for_host",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shm_model' has no attribute {name!r}")
