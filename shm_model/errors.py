"""Typed errors of shm-model, shared by the host, its workers and every client.

Each error has a stable wire ``code``; ``to_dict()``/``from_dict()`` carry it across
the socket so that the client raises the same class the host raised::

    ShmModelError
     ├── ConfigError            invalid setting; names the variable and the allowed values
     ├── ModelLoadError         the model cannot be found or loaded; says what was tried
     │    └── InsufficientMemory  a load or reload needs more memory than is available (names both)
     ├── HostUnavailable        no host answers on the socket, or it went away
     ├── PermissionDenied       the host refuses this user (peer uid check or socket mode)
     ├── Overloaded             the request queue is full; retry later
     ├── RequestTimeout         the request's deadline passed before its vectors were ready
     ├── WorkerCrashed          the request killed workers past its retries (poison isolation)
     ├── BadRequest             the request itself is wrong (says what and where)
     │    └── PayloadTooLarge   a frame over the size limit
     ├── ProtocolError          the peer broke the framing; the connection is closed
     └── InternalError          a failure inside the host that is not the caller's fault

This module imports nothing else of the project.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ShmModelError(Exception):
    """Base class of every error shm-model raises on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    @staticmethod
    def from_dict(data: object) -> ShmModelError:
        """Rebuild an error sent by the peer; unknown or malformed ones become ProtocolError."""
        if not isinstance(data, dict):
            return ProtocolError(f"malformed error object from peer: {data!r:.200}")
        code = data.get("code")
        message = data.get("message")
        details = data.get("details")
        cls = _BY_CODE.get(code) if isinstance(code, str) else None
        if cls is None or not isinstance(message, str):
            return ProtocolError(f"unknown error from peer: {data!r:.200}")
        return cls(message, **(details if isinstance(details, dict) else {}))


class ConfigError(ShmModelError, ValueError):
    code = "config_error"


class ModelLoadError(ShmModelError):
    code = "model_load_error"


class InsufficientMemory(ModelLoadError):
    code = "insufficient_memory"


class HostUnavailable(ShmModelError, ConnectionError):
    code = "host_unavailable"


class PermissionDenied(ShmModelError, PermissionError):
    code = "permission_denied"


class Overloaded(ShmModelError):
    code = "overloaded"


class RequestTimeout(ShmModelError, TimeoutError):
    code = "timeout"


class WorkerCrashed(ShmModelError):
    code = "worker_crashed"


class BadRequest(ShmModelError, ValueError):
    code = "bad_request"


class PayloadTooLarge(BadRequest):
    code = "payload_too_large"


class ProtocolError(ShmModelError):
    code = "protocol_error"


class InternalError(ShmModelError):
    code = "internal_error"


_BY_CODE: dict[str, type[ShmModelError]] = {
    cls.code: cls
    for cls in (
        ShmModelError,
        ConfigError,
        ModelLoadError,
        InsufficientMemory,
        HostUnavailable,
        PermissionDenied,
        Overloaded,
        RequestTimeout,
        WorkerCrashed,
        BadRequest,
        PayloadTooLarge,
        ProtocolError,
        InternalError,
    )
}

__all__ = [cls.__name__ for cls in _BY_CODE.values()]
