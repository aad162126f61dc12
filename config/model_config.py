"""Model, host and ModelManager configuration, built once from the environment by ``load()``.

The variables, their parsing and their help are declared once in ``config.settings``;
the dataclasses here hold the values and check what involves more than one of them.
Nothing reads the environment at import time and nothing imports torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from config.client_env import default_socket_path
from config.errors import ConfigError
from config.settings import (
    BUNDLED_ALIAS,
    DEFAULT_MODEL_NAME,
    DEVICES,
    MODES,
    MULTILINGUAL_ALIAS,
    RELOAD_MODES,
    SETTINGS,
    Setting,
    read,
    settings_help,
)

MULTILINGUAL_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "multilingual-e5-small"
)

__all__ = [
    "BUNDLED_ALIAS",
    "MULTILINGUAL_ALIAS",
    "MULTILINGUAL_DIR",
    "SETTINGS",
    "HostConfig",
    "ManagerConfig",
    "ModelConfig",
    "Setting",
    "default_socket_path",
    "settings_help",
]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to serve and where (the seed's ``ModelConfig``)."""

    name: str = DEFAULT_MODEL_NAME
    cache_dir: str = "./model_cache"
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("MODEL_NAME is empty")
        if len(set(self.names)) != len(self.names) or not all(self.names):
            raise ConfigError(f"MODEL_NAME={self.name!r:.200} lists an empty or repeated model name")
        if self.device not in DEVICES:
            raise ConfigError(f"MODEL_DEVICE={self.device!r} is invalid; allowed values: {', '.join(DEVICES)}")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> ModelConfig:
        return cls(**read("model", env))

    @property
    def names(self) -> list[str]:
        """The models to serve (``MODEL_NAME=a,b``); the first is the default."""
        return [part.strip() for part in self.name.split(",")]

    def first(self) -> ModelConfig:
        """This configuration for the default model alone."""
        return dataclasses.replace(self, name=self.names[0])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class HostConfig:
    """How the host serves: socket, workers, queue, batching, timeouts, weight placement."""

    socket_path: str = field(default_factory=default_socket_path)
    workers: int | None = None
    threads_per_worker: int | None = None
    queue_size: int = 1024
    request_timeout: float = 30.0
    max_request_timeout: float = 300.0
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    bulk_batch_ms: int = 250
    query_batch_ms: int = 250
    worker_spin_ms: int = 3
    bulk_share: float = 0.2
    pause_bulk: bool = True
    outside_load: bool = True
    dtype: str = "float32"
    weights: str = "auto"
    linear_kernel: str = "auto"
    forward: str = "auto"
    max_frame_bytes: int = 64 * 1024 * 1024
    allowed_uids: tuple[int, ...] = ()
    graceful_timeout: float = 30.0
    worker_grace: float = 5.0
    crash_retries: int = 1
    start_method: str = "auto"
    backend: str = "sentence-transformers"
    log_level: str = "info"
    trusted_uids: tuple[int, ...] = ()
    max_connections: int = 256
    max_buffered_bytes: int | None = None
    frame_timeout: float = 30.0
    reload: str = "auto"
    memory_limit: int | None = None
    cgroup: str = "auto"
    memory_low: float = 0.1
    psi_threshold: float = 10.0
    pressure_hold: float = 30.0
    pressure_interval: float = 1.0
    degraded_error_rate: float = 0.05
    degraded_p99_ms: int = 2000

    def __post_init__(self) -> None:
        if self.request_timeout > self.max_request_timeout:
            raise ConfigError(
                f"SHM_MODEL_REQUEST_TIMEOUT={self.request_timeout} exceeds "
                f"SHM_MODEL_MAX_REQUEST_TIMEOUT={self.max_request_timeout}"
            )
        if self.max_buffered_bytes is not None and self.max_buffered_bytes < self.max_frame_bytes:
            raise ConfigError(
                f"SHM_MODEL_MAX_BUFFERED_BYTES={self.max_buffered_bytes} is below "
                f"SHM_MODEL_MAX_FRAME_BYTES={self.max_frame_bytes}: the largest frame could never be read"
            )
        if self.reload not in RELOAD_MODES:
            raise ConfigError(f"SHM_MODEL_RELOAD={self.reload!r} is invalid; allowed values: {', '.join(RELOAD_MODES)}")
        if not os.path.isabs(self.socket_path):
            object.__setattr__(self, "socket_path", os.path.abspath(self.socket_path))

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> HostConfig:
        values = read("host", env)
        if "socket_path" not in values:
            values["socket_path"] = default_socket_path(env)
        return cls(**values)

    def worker_count(self, device: str) -> int:
        if device.startswith("cuda"):
            return 1
        return self.workers or min(2, os.cpu_count() or 1)

    def threads_for(self, workers: int, cores: int) -> int:
        """Threads of a worker when they are fixed (or of a busy host's worker, when on auto)."""
        return self.threads_per_worker or max(1, cores // workers)

    def resolved_start_method(self, device: str) -> str:
        if self.start_method == "auto":
            return "spawn" if device.startswith("cuda") else "fork"
        return self.start_method

    def buffered_bytes_limit(self) -> int:
        """Bytes of large request frames the host reads at once (SHM_MODEL_MAX_BUFFERED_BYTES)."""
        return self.max_buffered_bytes or 2 * self.max_frame_bytes


@dataclass(frozen=True, kw_only=True)
class ManagerConfig:
    """How ``ModelManager`` reaches the model: the migration and rollback feature flag."""

    mode: str = "auto"
    autostart: bool = False
    load_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"SHM_MODEL_MODE={self.mode!r} is invalid; allowed values: {', '.join(MODES)}")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> ManagerConfig:
        return cls(**read("manager", env))


def __getattr__(name: str) -> Any:
    # MODEL_CONFIG, the seed's dict, is built from the environment on first use, not at import.
    if name == "MODEL_CONFIG":
        value = ModelConfig.load().as_dict()
        globals()["MODEL_CONFIG"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
