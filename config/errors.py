"""The root of the project's error tree and the error of a bad setting.

They live here, not in ``shm_model.errors``, so that ``config`` needs nothing of the host
package; ``shm_model.errors`` re-exports both as part of its one tree. Each subclass
registers its wire ``code`` so that ``ShmModelError.from_dict`` rebuilds the class the
peer raised. This module imports nothing else of the project.
"""

from __future__ import annotations

from typing import Any, ClassVar

_BY_CODE: dict[str, type[ShmModelError]] = {}


class ShmModelError(Exception):
    """Base class of every error shm-model raises on purpose."""

    code: ClassVar[str] = "error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code in _BY_CODE:
            raise TypeError(f"error code {cls.code!r} of {cls.__name__} is taken by {_BY_CODE[cls.code].__name__}")
        _BY_CODE[cls.code] = cls

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
        protocol_error = _BY_CODE["protocol_error"]
        if not isinstance(data, dict):
            return protocol_error(f"malformed error object from peer: {data!r:.200}")
        code = data.get("code")
        message = data.get("message")
        details = data.get("details")
        cls = _BY_CODE.get(code) if isinstance(code, str) else None
        if cls is None or not isinstance(message, str):
            return protocol_error(f"unknown error from peer: {data!r:.200}")
        return cls(message, **(details if isinstance(details, dict) else {}))


_BY_CODE[ShmModelError.code] = ShmModelError


class ConfigError(ShmModelError, ValueError):
    """An invalid setting; the message names the variable and the allowed values."""

    code = "config_error"
