"""Logging with the process role and pid on every line."""

from __future__ import annotations

import logging
import sys

_role = "client"
FORMAT = "%(asctime)s %(levelname)s [%(role)s %(process)d] %(name)s: %(message)s"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


def set_role(role: str) -> None:
    """Name this process's role (supervisor, worker, client, ...) in its log lines."""
    global _role
    _role = role


def setup(level: str = "info", role: str | None = None) -> None:
    """Send log records to stderr with role and pid; used by the CLI entry points."""
    if role is not None:
        set_role(role)
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_shm_model", False):
            handler.setLevel(level.upper())
            root.setLevel(level.upper())
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._shm_model = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_RoleFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
