"""The settings a client reads, parsed with the standard library only.

The torch-free client (``shm_model.client``) must import in about 0.1 s, so it does not
import pydantic; it reads its three variables here. ``config.settings`` uses the same
value rules for the same variables, so both read them alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from config.errors import ConfigError

SECONDS_ALLOWED = "a number of seconds > 0"
UIDS_ALLOWED = "comma-separated numeric uids"
#: The default of SHM_MODEL_REQUEST_TIMEOUT.
REQUEST_TIMEOUT = 30.0


def seconds_value(raw: object) -> float:
    """A positive, finite number of seconds, from text or a number; ValueError otherwise."""
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ValueError(SECONDS_ALLOWED)
    return value


def uids_value(raw: object) -> tuple[int, ...]:
    """Numeric uids separated by commas or spaces; ValueError otherwise."""
    if isinstance(raw, tuple | list) and all(isinstance(uid, int) and uid >= 0 for uid in raw):
        return tuple(raw)
    if not isinstance(raw, str):
        raise ValueError(UIDS_ALLOWED)
    parts = raw.replace(",", " ").split()
    if not all(part.isdigit() for part in parts):
        raise ValueError(UIDS_ALLOWED)
    return tuple(int(part) for part in parts)


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "shm-model") if runtime else f"/tmp/shm-model-{os.getuid()}"
    return os.path.join(base, "host.sock")


def _raw(env: Mapping[str, str] | None, name: str) -> str | None:
    value = (os.environ if env is None else env).get(name)
    return value if value and value.strip() else None


def socket_path(env: Mapping[str, str] | None = None) -> str:
    """SHM_MODEL_SOCKET, or the default socket of this user."""
    raw = _raw(env, "SHM_MODEL_SOCKET")
    return raw.strip() if raw is not None else default_socket_path(env)


def request_timeout(env: Mapping[str, str] | None = None) -> float:
    """SHM_MODEL_REQUEST_TIMEOUT in seconds (default 30)."""
    raw = _raw(env, "SHM_MODEL_REQUEST_TIMEOUT")
    if raw is None:
        return REQUEST_TIMEOUT
    try:
        return seconds_value(raw)
    except ValueError:
        raise ConfigError(f"SHM_MODEL_REQUEST_TIMEOUT={raw!r} is invalid; allowed values: {SECONDS_ALLOWED}") from None


def trusted_uids(env: Mapping[str, str] | None = None) -> tuple[int, ...]:
    """SHM_MODEL_TRUSTED_UIDS: uids besides this user and root that may serve the socket."""
    raw = _raw(env, "SHM_MODEL_TRUSTED_UIDS")
    if raw is None:
        return ()
    try:
        return uids_value(raw)
    except ValueError:
        raise ConfigError(f"SHM_MODEL_TRUSTED_UIDS={raw!r} is invalid; allowed values: {UIDS_ALLOWED}") from None
