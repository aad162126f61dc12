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

The root and ``ConfigError`` are defined in ``config.errors`` (so that ``config`` needs nothing
of this package) and re-exported here; apart from that module, this one imports nothing of the
project.
"""

from __future__ import annotations

from config.errors import ConfigError, ShmModelError


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


class ModelNotFound(BadRequest):
    """A request names a model that is not served (the host lists the served ones)."""

    code = "model_not_found"


class ProtocolError(ShmModelError):
    code = "protocol_error"


class InternalError(ShmModelError):
    code = "internal_error"


__all__ = [
    cls.__name__
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
]
