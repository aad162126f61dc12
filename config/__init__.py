"""Configuration of shm-model, read from the environment by explicit ``load()`` calls.

``config.settings`` declares every environment variable; ``config.model_config``,
``config.api_config`` and ``config.rag_config`` hold the values. This package imports none
of them eagerly, so that the client's ``config.client_env`` stays light, and it imports
nothing of ``shm_model``, ``api_server`` or ``tablerag``.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "HostConfig": "config.model_config",
    "ManagerConfig": "config.model_config",
    "ModelConfig": "config.model_config",
    "Setting": "config.settings",
    "settings_help": "config.settings",
}

__all__ = ["HostConfig", "ManagerConfig", "ModelConfig", "Setting", "settings_help"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'config' has no attribute {name!r}")
