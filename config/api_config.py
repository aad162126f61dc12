"""The API server's configuration (``API_*``, ``CHAT_*``, ``RAG_DB``), built by ``ApiConfig.load()``.

It lives here, not in ``api_server``, so that ``shm-model --help`` and the settings check need
no HTTP stack.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from config.errors import ConfigError
from config.settings import host_pattern, read

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK_NAMES = ("localhost",)
_POSITIVE = ("port", "max_body_bytes", "max_json_bytes", "keep_alive", "limit_concurrency", "route_concurrency",
             "job_workers", "job_queue")  # fmt: skip
_SECONDS = ("body_timeout", "header_timeout", "job_timeout", "chat_timeout")


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """The API server's settings; ``load()`` reads them from the environment."""

    db: str = str(ROOT / "data" / "rag.sqlite3")
    upload_dir: str = str(ROOT / "data" / "uploads")
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 50 << 20
    max_json_bytes: int = 2 << 20
    body_timeout: float = 60.0
    header_timeout: float = 10.0
    keep_alive: int = 5
    limit_concurrency: int = 2048
    route_concurrency: int = 32
    job_timeout: float = 600.0
    job_workers: int = 1
    job_queue: int = 16
    keep_uploads: bool = False
    allowed_hosts: tuple[str, ...] = ()  # () is the loopback names and the bound address
    api_key: str = ""
    allow_open: bool = False
    chat_base: str = ""
    chat_key: str = ""
    chat_model: str = ""
    chat_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; allowed values: >= 1")
        for name in _SECONDS:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; allowed values: seconds > 0")
        if not self.allowed_hosts:
            defaults = ("localhost", "127.0.0.1", "[::1]", host_pattern(self.host))
            object.__setattr__(self, "allowed_hosts", tuple(dict.fromkeys(defaults)))

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ApiConfig:
        """Settings from ``env`` (default: the process environment), then ``overrides`` (the command
        line's); a bad value raises ConfigError naming the variable and the allowed values."""
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)} (this is a bug)")
        values = read("api", os.environ if env is None else env)
        values.update(overrides)
        return cls(**values)

    def check_bind(self) -> None:
        """A non-loopback address needs API_KEY, or API_ALLOW_OPEN=true."""
        if is_loopback(self.host) or self.api_key or self.allow_open:
            return
        raise ConfigError(
            f"API_HOST={self.host!r} is not a loopback address; set API_KEY, or API_ALLOW_OPEN=true to serve it open"
        )
