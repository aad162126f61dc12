"""Logging with the process role and pid on every line, as text or as one JSON object a line.

``SHM_MODEL_LOG_FORMAT=json`` (read by ``setup()``) writes each record as a JSON object with
``time``, ``level``, ``role``, ``pid``, ``logger`` and ``message`` (plus ``exc_info`` and any
``extra`` fields). Forked workers inherit the supervisor's handler; ``set_role`` renames them.
"""

from __future__ import annotations

import logging
import sys

_role = "client"
FORMAT = "%(asctime)s %(levelname)s [%(role)s %(process)d] %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(role)s %(process)d %(name)s %(message)s"
JSON_RENAMES = {"asctime": "time", "levelname": "level", "process": "pid", "name": "logger"}


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


def set_role(role: str) -> None:
    """Name this process's role (supervisor, worker, client, ...) in its log lines."""
    global _role
    _role = role


def formatter(kind: str) -> logging.Formatter:
    """The formatter of SHM_MODEL_LOG_FORMAT ``kind``: text or json."""
    if kind == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(JSON_FIELDS, rename_fields=JSON_RENAMES, json_ensure_ascii=False)
    return logging.Formatter(FORMAT)


def setup(level: str | None = None, role: str | None = None, log_format: str | None = None) -> None:
    """Send log records to stderr with role and pid; used by the entry points. ``level`` and
    ``log_format`` default to SHM_MODEL_LOG_LEVEL and SHM_MODEL_LOG_FORMAT (a bad value raises
    ConfigError)."""
    if level is None or log_format is None:
        from config.settings import read

        env = read("logs")
        level = level or env.get("log_level", "info")
        log_format = log_format or env.get("format", "text")
    if role is not None:
        set_role(role)
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_shm_model", False):
            handler.setLevel(level.upper())
            handler.setFormatter(formatter(log_format))
            root.setLevel(level.upper())
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._shm_model = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter(log_format))
    handler.addFilter(_RoleFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
