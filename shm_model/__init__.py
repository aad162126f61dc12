"""shm-model: one copy of a sentence-embedding model, shared by every process that needs it.

Public API::

    from shm_model import ModelManager          # the model for this process: host or local
    model = ModelManager.get_instance().get_model()
    from shm_model import HostClient            # encode through a running host directly
    from shm_model import errors                # typed errors (also re-exported here)

Everything but the errors is imported lazily so that ``import shm_model`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shm_model.errors import (
    BadRequest,
    ConfigError,
    HostUnavailable,
    InternalError,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    ShmModelError,
    WorkerCrashed,
)

if TYPE_CHECKING:
    from config.model_config import ManagerConfig, ModelConfig
    from shm_model.client import HostClient, wait_for_host
    from shm_model.manager import ManagedModel, ModelManager, ModelStatus, get_model_with_fallback

__version__ = "0.1.0"

_LAZY = {
    "HostClient": "shm_model.client",
    "wait_for_host": "shm_model.client",
    "ManagedModel": "shm_model.manager",
    "ModelManager": "shm_model.manager",
    "ModelStatus": "shm_model.manager",
    "get_model_with_fallback": "shm_model.manager",
    "ModelConfig": "config.model_config",
    "ManagerConfig": "config.model_config",
}

__all__ = [
    "BadRequest",
    "ConfigError",
    "HostClient",
    "HostUnavailable",
    "InternalError",
    "ManagedModel",
    "ManagerConfig",
    "ModelConfig",
    "ModelLoadError",
    "ModelManager",
    "ModelNotFound",
    "ModelStatus",
    "Overloaded",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "RequestTimeout",
    "ShmModelError",
    "WorkerCrashed",
    "get_model_with_fallback",
    "wait_for_host",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shm_model' has no attribute {name!r}")
