"""The chat (RAG) API server on the shared model host.

Endpoints: ``POST /chat`` (answer with citations: from an OpenAI-compatible chat model when
one is configured, else extracted from the best passages and table rows), ``POST /search``,
``POST /documents`` + ``GET /documents/jobs/{id}`` (ingestion by a ``rag_with_tables.py``
subprocess that uses the host), ``POST /v1/embeddings`` + ``GET /v1/models[/{id}]``
(OpenAI-compatible: ``dimensions``, token-array inputs, usage counted by the model's
tokenizer), ``POST /embed`` (also ``POST /``) + ``POST /tokenize`` + ``GET /info`` +
``GET /health`` (TEI-compatible), ``GET /model/status``, ``GET /health/live``,
``GET /health/ready``, ``GET /metrics`` (the model's metrics and per-route HTTP metrics) and
``GET /`` (a chat page).

Run it with ``shm-model-api`` (uvicorn; also ``shm-model api``) next to ``shm-model serve``.
Settings come from the environment: ``API_*``, ``CHAT_*``, ``RAG_DB`` (``config.api_config``)
and the model manager's ``SHM_MODEL_*``, all declared in ``config.settings`` and printed by
``shm-model-api --help``.

Every request is bounded: the body by bytes actually received (per route) and by time, the
input by items and characters before it reaches the model, the model calls by a per-route
count (over it: 429), the responses by size, the ingestion jobs by a queue, a worker count
and a wall-clock limit. Other hosts (DNS rebinding) and cross-site POSTs are refused, and
``API_KEY`` guards every route but ``/health``, ``/health/*`` and the chat page.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import Counter, Histogram
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator.metrics import Info as RequestInfo
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from config import settings as config_settings
from config.api_config import ApiConfig
from config.settings import host_pattern
from shm_model import errors
from shm_model.manager import ModelManager
from shm_model.metrics import REGISTRY
from tablerag.answers import ChatEndpoint, citations, extractive_answer, llm_answer
from tablerag.chunking import terms
from tablerag.documents import SUPPORTED
from tablerag.retrieval import Mode, Retriever
from tablerag.store import ModelMismatch, Store, StoreError, open_store

log = logging.getLogger("api_server")

ROOT = Path(__file__).resolve().parent
READY_TIMEOUT = 2.0
#: Inputs of one /v1/embeddings or /embed request, and characters of each (infinity's 122,880).
MAX_INPUTS = 1024
MAX_INPUT_CHARS = 122_880
#: Token ids of one token-array input (OpenAI's limit per input).
MAX_INPUT_TOKENS = 8192
#: Tokens one /tokenize response lists, all inputs together (about 60 bytes of JSON each).
MAX_TOKENIZE_TOKENS = 32_768
#: Routes that answer errors in TEI's shape ({"error": "...", "error_type": "..."}).
TEI_ROUTES = ("/embed", "/tokenize", "/info", "/health")
#: Results of one /search and one /chat.
MAX_SEARCH_K = 50
MAX_CHAT_K = 20
#: An error message is cut to this many characters (it never echoes the input).
MAX_MESSAGE_CHARS = 300
#: Finished ingestion jobs remembered for GET /documents/jobs/{id}.
MAX_JOBS = 1000
#: An uploaded file's name is cut to this many UTF-8 bytes, its suffix kept (NAME_MAX is 255).
MAX_NAME_BYTES = 200
#: Largest incomplete HTTP event (request line and headers) uvicorn's h11 buffers.
MAX_HEADER_BYTES = 16 << 10
#: Environment variables kept from the ingestion subprocess.
SECRET_ENV = ("CHAT_API_KEY", "API_KEY")


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Settings(ApiConfig):
    """The API server's settings (``config.api_config``; the variables are in ``config.settings``)."""

    def chat_endpoint(self) -> ChatEndpoint:
        return ChatEndpoint(base=self.chat_base, model=self.chat_model, key=self.chat_key, timeout=self.chat_timeout)


def settings_help() -> str:
    """The environment variables the API server reads, for ``shm-model-api --help``."""
    return config_settings.settings_help(("api", "logs", "manager", "model"))


# --- request and response bodies ----------------------------------------------------------

#: Texts, or token ids of the served model's tokenizer (one array, or one per input).
Inputs = str | list[str] | list[int] | list[list[int]]


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inputs(items: Any, name: str) -> None:
    """Counts, kinds and sizes of an input before pydantic walks it: one short error, never one per
    item. Strings, token ids, or lists of token ids, all of one kind."""
    if isinstance(items, str):
        if len(items) > MAX_INPUT_CHARS:
            raise ValueError(f"{name} has {len(items)} characters; at most {MAX_INPUT_CHARS}")
        return
    if not isinstance(items, list):
        return  # pydantic names the type
    if items and _is_id(items[0]):
        if len(items) > MAX_INPUT_TOKENS:
            raise ValueError(f"{name} has {len(items)} token ids; at most {MAX_INPUT_TOKENS}")
        kind = "token ids"
    elif len(items) > MAX_INPUTS:
        raise ValueError(f"{name} has {len(items)} items; at most {MAX_INPUTS}")
    else:
        kind = "lists of token ids" if items and isinstance(items[0], list) else "strings"
    for i, item in enumerate(items):
        if kind == "strings" and isinstance(item, str):
            if len(item) > MAX_INPUT_CHARS:
                raise ValueError(f"{name}[{i}] has {len(item)} characters; at most {MAX_INPUT_CHARS}")
        elif kind == "lists of token ids" and isinstance(item, list):
            if len(item) > MAX_INPUT_TOKENS:
                raise ValueError(f"{name}[{i}] has {len(item)} token ids; at most {MAX_INPUT_TOKENS}")
            if not all(_is_id(t) for t in item):
                raise ValueError(f"{name}[{i}] is a list that is not all integer token ids")
        elif not (kind == "token ids" and _is_id(item)):
            raise ValueError(
                f"{name}[{i}] is a {type(item).__name__}, but {name}[0] makes {name} {kind}; "
                "give strings, token ids, or lists of token ids"
            )


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; ``input`` may be token ids of the served model's tokenizer."""

    input: Inputs
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_inputs(data.get("input"), "input")
        return data


class EmbedRequest(BaseModel):
    """TEI's ``POST /embed``. ``truncate`` null is TEI's default without ``--auto-truncate``: an
    input over the model's length is refused (413), not cut."""

    inputs: Inputs
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"
    prompt_name: str | None = None
    dimensions: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_inputs(data.get("inputs"), "inputs")
        return data


class TokenizeRequest(BaseModel):
    """TEI's ``POST /tokenize``."""

    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_inputs(data.get("inputs"), "inputs")
        return data


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    k: int = Field(default=5, ge=1, le=MAX_SEARCH_K)
    mode: Mode = "hybrid"


class ChatRequest(BaseModel):
    question: str = Field(min_length=1, max_length=4000)
    k: int = Field(default=5, ge=1, le=MAX_CHAT_K)
    mode: Mode = "hybrid"
    stream: bool = False


# --- errors to HTTP, in one place --------------------------------------------------------------


class ModelNotFound(errors.BadRequest):
    """A request names a model this server does not serve."""

    code = "model_not_found"


STATUS = {
    ModelNotFound: 404,
    errors.PayloadTooLarge: 413,
    errors.BadRequest: 422,
    errors.Overloaded: 429,
    errors.HostUnavailable: 503,
    errors.PermissionDenied: 503,
    errors.ModelLoadError: 503,
    errors.RequestTimeout: 504,
}


#: TEI's ``error_type`` of a status (TEI: Validation 413, Tokenizer 422, Overloaded 429, Unhealthy 503).
TEI_ERROR_TYPES = {429: "Overloaded", 503: "Unhealthy"}


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    path: str = "",
    param: str | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``), or in TEI's
    (``{"error": "...", "error_type": "..."}``) on TEI's routes."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    if path in TEI_ROUTES or path == "/":
        kind = TEI_ERROR_TYPES.get(status, "Backend" if status >= 500 else "Validation")
        return JSONResponse({"error": message, "error_type": kind}, status_code=status, headers=headers)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def status_for(exc: errors.ShmModelError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


class BodyRefused(HTTPException):
    """A request body over its route's limit (413) or not received in time (408). An
    HTTPException, so that FastAPI passes it through its body parsing unchanged."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code, self.message = code, message

    def response(self, path: str) -> JSONResponse:
        return error_response(self.status_code, self.code, self.message, path=path)


class BodyLimit:
    """Bounds every request body by the bytes actually received, whatever Content-Length or
    Transfer-Encoding say, and by time: ``receive`` is wrapped and counts. A declared length over
    the limit is refused before anything is read. ``/documents`` has the large limit; every
    other route the small one."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app, self.settings = app, settings

    def limit_for(self, path: str) -> int:
        return self.settings.max_body_bytes if path == "/documents" else self.settings.max_json_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        too_large = BodyRefused(413, "payload_too_large", f"the body is over {limit} bytes")
        for name, value in scope.get("headers") or []:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await too_large.response(scope["path"])(scope, _no_body, send)
                return
        received = 0
        complete = False
        deadline = time.monotonic() + self.settings.body_timeout
        started = False

        async def counted() -> dict[str, Any]:
            nonlocal received, complete
            if complete:
                return await receive()  # after the body: only a disconnect is left to hear
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise BodyRefused(
                    408, "request_timeout", f"the body did not arrive within {self.settings.body_timeout:g}s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
                complete = not message.get("more_body", False)
            return message

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyRefused as exc:
            if started:
                raise
            await exc.response(scope["path"])(scope, _no_body, send)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.disconnect"}


class Guard:
    """Refuses cross-site state changes and, with ``API_KEY``, requests without the key.

    A POST (any method but GET/HEAD/OPTIONS) with ``Sec-Fetch-Site: cross-site``, or whose
    ``Origin`` (else ``Referer``) names a host that is not allowed, is 403: a page elsewhere
    cannot upload or ask in the user's name. No CORS headers are sent, so no other origin can
    read a response either. The Host header itself is checked by TrustedHostMiddleware."""

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.hosts = settings.allowed_hosts
        self.key = settings.api_key.encode()

    def _allowed(self, url: str) -> bool:
        try:
            host = urlsplit(url).hostname
        except ValueError:
            return False
        if not host:
            return False
        host = host_pattern(host)
        return any(host == p or (p.startswith("*") and host.endswith(p[1:])) for p in self.hosts)

    def refusal(self, scope: dict[str, Any]) -> JSONResponse | None:
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        path = scope["path"]
        if scope["method"] not in self.SAFE:
            if headers.get(b"sec-fetch-site", b"").lower() == b"cross-site":
                return error_response(403, "forbidden", "cross-site requests are refused", path=path)
            source = headers.get(b"origin") or headers.get(b"referer")
            if source is not None and not self._allowed(source.decode("latin-1")):
                return error_response(403, "forbidden", "requests from another origin are refused", path=path)
        open_route = path == "/health" or path.startswith("/health/") or (path == "/" and scope["method"] in self.SAFE)
        if self.key and not open_route:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return error_response(
                    401, "unauthorized", "a valid API key is needed: Authorization: Bearer <API_KEY>",
                    {"WWW-Authenticate": "Bearer"}, path=path,
                )  # fmt: skip
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (refused := self.refusal(scope)) is not None:
            await refused(scope, _no_body, send)
            return
        await self.app(scope, receive, send)


class Admission:
    """Model calls of one route, run in threads off the event loop: at most ``limit`` at once,
    and the next one is refused at once with Overloaded (429) rather than queued."""

    def __init__(self, name: str, limit: int) -> None:
        self.name, self.limit = name, limit
        self.active = 0
        self.threads = anyio.CapacityLimiter(limit)

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        if self.active >= self.limit:
            raise errors.Overloaded(f"{self.name}: {self.limit} requests in progress; retry later")
        self.active += 1
        try:
            return await anyio.to_thread.run_sync(func, *args, limiter=self.threads)
        finally:
            self.active -= 1


# --- ingestion jobs ----------------------------------------------------------------------------


@dataclass
class Job:
    id: str
    files: list[str]
    folder: str = ""
    names: dict[str, str] = field(default_factory=dict)  # stored path -> the uploader's name
    state: str = "queued"  # queued | running | done | failed
    done: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    chunks: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    message: str = ""

    def name(self, path: str) -> str:
        return self.names.get(os.path.realpath(path), os.path.basename(path))

    def to_dict(self) -> dict[str, Any]:
        total = len(self.files)
        return {
            "id": self.id,
            "state": self.state,
            "files": total,
            "processed": len(self.done) + len(self.errors),
            "progress": round((len(self.done) + len(self.errors)) / total, 3) if total else 1.0,
            "chunks": self.chunks,
            "errors": self.errors,
            "started": self.started,
            "finished": self.finished,
            "message": self.message,
        }


class Jobs:
    """Ingestion subprocesses (``rag_with_tables.py ingest --events``): a bounded queue read by a
    fixed pool of ``job_workers`` runner threads; each job runs in its own process group, killed
    past ``job_timeout``. Queued jobs are bounded by the queue, finished ones by ``MAX_JOBS``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=settings.job_queue)
        self._procs: dict[int, subprocess.Popen[str]] = {}
        self._stopping = threading.Event()
        self._runners = [
            threading.Thread(target=self._runner, name=f"ingest-{n}", daemon=True) for n in range(settings.job_workers)
        ]
        for runner in self._runners:
            runner.start()

    def check_room(self) -> None:
        """Overloaded (429) when the queue is full, before an upload is stored."""
        if self._queue.full():
            raise errors.Overloaded(f"{self.settings.job_queue} ingestion jobs are waiting; retry later")

    def submit(self, files: list[str], *, folder: str = "", names: dict[str, str] | None = None) -> Job:
        job = Job(uuid.uuid4().hex[:12], files, folder=folder, names=names or {})
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise errors.Overloaded(f"{self.settings.job_queue} ingestion jobs are waiting; retry later") from None
            finished = [j.id for j in self.jobs.values() if j.finished is not None]
            for old in finished[: max(0, len(self.jobs) - MAX_JOBS + 1)]:
                del self.jobs[old]  # the oldest finished jobs make room
            self.jobs[job.id] = job
        return job

    def _runner(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                if self._stopping.is_set():
                    job.state, job.message = "failed", "the server stopped before the job ran"
                else:
                    self._run(job)
            except Exception as exc:  # a runner must survive any one job
                log.exception("ingestion job %s", job.id)
                job.state, job.message = "failed", f"internal error: {type(exc).__name__}"
            finally:
                job.finished = job.finished or time.time()
                if job.folder and not self.settings.keep_uploads:
                    shutil.rmtree(job.folder, ignore_errors=True)

    def _run(self, job: Job) -> None:
        job.state = "running"
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env["RAG_DB"] = self.settings.db
        cmd = [sys.executable, str(ROOT / "rag_with_tables.py"), "ingest", "--events", *job.files]
        with tempfile.TemporaryFile(mode="w+") as errors_file:  # a pipe could fill up and stall the child
            try:
                proc = subprocess.Popen(
                    cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors_file, text=True,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                job.state, job.message, job.finished = "failed", f"cannot start the ingestion: {exc}", time.time()
                return
            timed_out = threading.Event()

            def kill() -> None:
                timed_out.set()
                _kill_group(proc)

            timer = threading.Timer(self.settings.job_timeout, kill)
            timer.daemon = True
            with self._lock:
                self._procs[proc.pid] = proc
            if self._stopping.is_set():
                _kill_group(proc)
            timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    self._event(job, line)
                code = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:  # only when this thread was interrupted
                    _kill_group(proc)
                    proc.wait()
                self._procs.pop(proc.pid, None)
                if proc.stdout is not None:
                    proc.stdout.close()
            errors_file.seek(0)
            stderr = errors_file.read(64 << 10)
        job.finished = time.time()
        if timed_out.is_set():
            job.state = "failed"
            job.message = f"stopped after API_JOB_TIMEOUT={self.settings.job_timeout:g}s"
        elif code in (0, 1):
            job.state = "done"
            job.message = "some files failed" if job.errors else "ok"
        else:
            job.state = "failed"
            job.message = (stderr.strip().splitlines() or [f"exit status {code}"])[-1][:MAX_MESSAGE_CHARS]

    @staticmethod
    def _event(job: Job, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        if not isinstance(event, dict) or event.get("event") != "file":
            return
        name = job.name(str(event.get("path", "")))
        if event.get("error"):
            job.errors[name] = str(event["error"])[:MAX_MESSAGE_CHARS]
        else:
            job.done.append(name)
            job.chunks += int(event.get("chunks", 0))

    def stop(self) -> None:
        """Kill the running jobs' process groups, drop the queued jobs, end the runners."""
        self._stopping.set()
        with suppress(queue.Empty):
            while True:
                job = self._queue.get_nowait()
                if job is not None:
                    job.state, job.message, job.finished = (
                        "failed",
                        "the server stopped before the job ran",
                        time.time(),
                    )
                    if job.folder and not self.settings.keep_uploads:
                        shutil.rmtree(job.folder, ignore_errors=True)
        for _ in self._runners:
            with suppress(queue.Full):
                self._queue.put_nowait(None)
        with self._lock:
            running = list(self._procs.values())
        for proc in running:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def short_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name`` cut to ``limit`` UTF-8 bytes on a character boundary, its suffix kept."""
    if len(name.encode()) <= limit:
        return name
    stem, suffix = os.path.splitext(name)
    if len(suffix.encode()) > limit // 4:
        stem, suffix = name, ""
    room = limit - len(suffix.encode())
    return stem.encode()[:room].decode("utf-8", "ignore") + suffix


def _safe_name(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/")).strip()
    base = re.sub(r"[\x00-\x1f\x7f]", "", base)
    if not base or base in (".", ".."):
        raise errors.BadRequest("an uploaded file has no usable name")
    return short_name(base)


# --- embeddings: names, tokenizer, per-route metrics -----------------------------------------------

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests answered, by route template, method and status code",
    ["handler", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Seconds to answer an HTTP request, by route template and method",
    ["handler", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)


def observe_http(info: RequestInfo) -> None:
    """Count one answered request (``prometheus-fastapi-instrumentator`` calls it for each)."""
    handler = info.modified_handler
    HTTP_REQUESTS.labels(handler, info.method, info.modified_status).inc()
    HTTP_LATENCY.labels(handler, info.method).observe(info.modified_duration)


def served_names(info: dict[str, Any]) -> set[str]:
    """Names a request may give the served model: its name (MODEL_NAME of the host: an alias, a
    hub id or a folder), that name's last part, and its folder's name."""
    names = {str(info.get("model") or "")}
    names.add(os.path.basename(next(iter(names)).rstrip("/")))
    names.add(os.path.basename(str(info.get("model_path") or "").rstrip("/")))
    return names - {""}


def model_card(info: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(info["model"]), "object": "model", "created": 0, "owned_by": "shm-model"}


def load_tokenizer(folder: str) -> Any:
    """The ``tokenizers`` tokenizer of a model folder, without its own truncation or padding."""
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not folder or not os.path.isfile(path):
        raise errors.BadRequest(f"token ids need the model's tokenizer.json; there is none in {folder or '(none)'}")
    loaded = Tokenizer.from_file(path)
    loaded.no_truncation()
    loaded.no_padding()
    return loaded


def decode_ids(tokenizer: Any, arrays: list[list[int]], name: str) -> list[str]:
    """Token-id inputs as texts (special tokens dropped: the model adds its own), each id checked
    against the vocabulary and each text against the input bound."""
    vocabulary = tokenizer.get_vocab_size(with_added_tokens=True)
    for i, ids in enumerate(arrays):
        if not ids:
            raise errors.BadRequest(f"{name}[{i}] is an empty token array", param=name)
        bad = next((t for t in ids if not 0 <= t < vocabulary), None)
        if bad is not None:
            raise errors.BadRequest(
                f"{name}[{i}] has the token id {bad}, outside the model's vocabulary (0 to {vocabulary - 1})",
                param=name,
            )
    texts = tokenizer.decode_batch(arrays, skip_special_tokens=True)
    for i, text in enumerate(texts):
        if len(text) > MAX_INPUT_CHARS:
            raise errors.BadRequest(f"{name}[{i}] decodes to {len(text)} characters; at most {MAX_INPUT_CHARS}")
    return texts


def keep_last_tokens(tokenizer: Any, text: str, prompt: str, limit: int) -> str:
    """``text`` without its first tokens, so that with ``prompt`` and the special tokens it fits in
    ``limit`` tokens (TEI's truncation_direction=Left); the host then cuts any token that the
    re-tokenized start of the text adds."""
    encoding = tokenizer.encode(text)
    content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
    room = limit - (len(encoding.ids) - len(content))
    if prompt:
        room -= len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    if len(content) <= room:
        return text
    if room < 1:
        raise errors.BadRequest(f"the prompt takes the model's whole length of {limit} tokens")
    return text[encoding.offsets[content[len(content) - room]][0] :]


def tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[dict[str, Any]]]:
    """TEI's /tokenize answer: each text's tokens with their id, text, whether special, and their
    character span in the text (null for a special token)."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    total = sum(len(e.ids) for e in encodings)
    if total > MAX_TOKENIZE_TOKENS:
        raise errors.PayloadTooLarge(f"the inputs have {total} tokens; /tokenize lists at most {MAX_TOKENIZE_TOKENS}")
    out = []
    for text, encoding in zip(texts, encodings, strict=True):
        tokens = []
        for token_id, token, special, (start, stop) in zip(
            encoding.ids, encoding.tokens, encoding.special_tokens_mask, encoding.offsets, strict=True
        ):
            if special:
                tokens.append({"id": token_id, "text": token, "special": True, "start": None, "stop": None})
            else:
                span = {"start": start, "stop": stop}
                tokens.append({"id": token_id, "text": text[start:stop], "special": False, **span})
        out.append(tokens)
    return out


def pooling_of(folder: str) -> str:
    """The pooling of a sentence-transformers folder (``1_Pooling/config.json``), as TEI names it."""
    try:
        with open(os.path.join(folder, "1_Pooling", "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return "unknown"
    for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                      ("pooling_mode_lasttoken", "last_token")):  # fmt: skip
        if config.get(key):
            return name
    return "unknown"


# --- the app ---------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.load()
    state: dict[str, Any] = {}
    admission = {
        name: Admission(name, settings.route_concurrency)
        for name in ("/v1/embeddings", "/embed", "/tokenize", "/search", "/chat")
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["manager"] = ModelManager.get_instance()
        state["jobs"] = Jobs(settings)
        # The Korean tokenizer loads on first use (seconds, holding the GIL): load it before serving.
        await anyio.to_thread.run_sync(terms, "준비")
        yield
        state["jobs"].stop()
        store = state.get("store")
        if store is not None:
            store.close()

    app = FastAPI(title="shm-model RAG API", version="1.0", lifespan=lifespan)

    def model() -> Any:
        return state["manager"].get_model()

    def store() -> Store:
        if "store" not in state:
            state["store"] = open_store(settings.db)
        return state["store"]

    def retriever() -> Retriever:
        current = model()
        cached = state.get("retriever")
        if cached is None or cached.store is not store():
            cached = state["retriever"] = Retriever(store(), current)
        return cached

    # The last one added runs first: Host, then origin and key, then the body.
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(Guard, settings=settings)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    # Outermost: every answer is counted, refusals by the middlewares above included.
    Instrumentator(should_group_status_codes=False, registry=REGISTRY).add(observe_http).instrument(app)

    @app.exception_handler(errors.ShmModelError)
    async def shm_error(request: Request, exc: errors.ShmModelError) -> JSONResponse:
        status = status_for(exc)
        headers = {"Retry-After": "1"} if status == 429 else None
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        param = exc.details.get("param")
        param = param if isinstance(param, str) else None
        return error_response(status, exc.code, exc.message, headers, path=request.url.path, param=param)

    @app.exception_handler(BodyRefused)
    async def body_refused(request: Request, exc: BodyRefused) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(ModelMismatch)
    async def mismatch(request: Request, exc: ModelMismatch) -> JSONResponse:
        return error_response(409, "model_mismatch", str(exc), path=request.url.path)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return error_response(503, "store_unavailable", str(exc), path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        found = exc.errors()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')[:40] or 'body'}: {str(e['msg'])[:200]}"
            for e in found[:3]
        )
        if len(found) > 3:
            problems += f" (and {len(found) - 3} more)"
        return error_response(422, "bad_request", problems, path=request.url.path)

    # --- health, status, metrics ---------------------------------------------------------

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}  # on the event loop: it answers while every thread is busy

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        started = time.perf_counter()
        try:
            model().encode("ready", timeout=READY_TIMEOUT)
        except errors.ShmModelError as exc:
            return error_response(503, exc.code, f"not ready: {exc}")
        return JSONResponse({"status": "ready", "encode_ms": round((time.perf_counter() - started) * 1000, 1)})

    @app.get("/model/status")
    def model_status() -> dict[str, Any]:
        manager: ModelManager = state["manager"]
        status = manager.get_status().to_dict()
        status["host"] = manager.host_status()
        return status

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        from prometheus_client import generate_latest

        from shm_model import metrics as m

        state["manager"].host_status()  # refreshes the host's gauges
        return PlainTextResponse(generate_latest(m.REGISTRY).decode(), media_type="text/plain; version=0.0.4")

    # --- embeddings: OpenAI's and TEI's routes -------------------------------------------------

    def served() -> dict[str, Any]:
        return model().describe()

    def tokenizer(info: dict[str, Any]) -> Any:
        """The served model's tokenizer (``tokenizer.json`` in its folder), loaded once per folder."""
        folder = str(info.get("model_path") or "")
        cached = state.get("tokenizer")
        if cached is None or cached[0] != folder:
            cached = state["tokenizer"] = (folder, load_tokenizer(folder))
        return cached[1]

    def check_model(name: str | None, info: dict[str, Any]) -> None:
        if name is not None and name not in served_names(info):
            raise ModelNotFound(
                f"the model {name[:80]!r} is not served here; this server serves {info.get('model')!r}",
                param="model",
            )

    def check_dimensions(dimensions: int | None, info: dict[str, Any]) -> int | None:
        dimension = int(info.get("dimension") or 0)
        if dimensions is not None and dimensions > dimension:
            raise errors.BadRequest(
                f"dimensions={dimensions} is more than the dimension of {info.get('model')!r}, {dimension}",
                param="dimensions",
            )
        return dimensions

    def texts_of(items: Any, name: str, info: dict[str, Any]) -> list[str]:
        """The texts of an input: strings as they are, token ids decoded by the model's tokenizer."""
        if isinstance(items, str):
            items = [items]
        if not items:
            raise errors.BadRequest(f"{name} must not be empty", param=name)
        if _is_id(items[0]):
            items = [items]
        if isinstance(items[0], list):
            items = decode_ids(tokenizer(info), items, name)
        for i, text in enumerate(items):
            if not text:
                raise errors.BadRequest(f"{name}[{i}] is an empty string", param=name)
        return items

    def openai_embed(body: EmbeddingsRequest) -> JSONResponse:
        info = served()
        check_model(body.model, info)
        dimensions = check_dimensions(body.dimensions, info)
        texts = texts_of(body.input, "input", info)
        vectors, tokens = model().encode(texts, normalize_embeddings=True, truncate_dim=dimensions, return_usage=True)
        data = []
        for i, vector in enumerate(np.asarray(vectors, dtype=np.float32)):
            if body.encoding_format == "base64":
                embedding: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            else:
                embedding = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": str(info["model"]),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )  # rendered here, in the thread, not on the event loop

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(served())]}

    @app.get("/v1/models/{model_id:path}")
    def model_by_id(model_id: str) -> dict[str, Any]:
        info = served()
        check_model(model_id, info)
        return model_card(info)

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingsRequest) -> JSONResponse:
        return await admission["/v1/embeddings"].run(openai_embed, body)

    def tei_embed(body: EmbedRequest) -> JSONResponse:
        info = served()
        dimensions = check_dimensions(body.dimensions, info)
        texts = texts_of(body.inputs, "inputs", info)
        truncate = bool(body.truncate)
        if truncate and body.truncation_direction.lower() == "left":
            prompt = (info.get("prompts") or {}).get(body.prompt_name or "", "")
            limit = int(info.get("max_seq_length") or 512)
            texts = [keep_last_tokens(tokenizer(info), text, prompt, limit) for text in texts]
        vectors = model().encode(
            texts,
            normalize_embeddings=body.normalize,
            truncate_dim=dimensions,
            truncate=truncate,
            prompt_name=body.prompt_name,
        )
        return JSONResponse(np.asarray(vectors, dtype=np.float32).tolist())

    @app.post("/embed", response_model=None)
    async def embed(body: EmbedRequest) -> JSONResponse:
        return await admission["/embed"].run(tei_embed, body)

    @app.post("/", response_model=None)
    async def embed_at_root(body: EmbedRequest) -> JSONResponse:
        """TEI's root route: an embedding model embeds (``InferenceClient(base_url)`` posts here)."""
        return await admission["/embed"].run(tei_embed, body)

    def tei_tokenize(body: TokenizeRequest) -> JSONResponse:
        info = served()
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        prompt = ""
        if body.prompt_name is not None:
            prompts = info.get("prompts") or {}
            if body.prompt_name not in prompts:
                raise errors.BadRequest(
                    f"unknown prompt_name {body.prompt_name[:80]!r}; this model has: {', '.join(prompts) or 'none'}"
                )
            prompt = prompts[body.prompt_name]
        return JSONResponse(tokenize(tokenizer(info), [prompt + t for t in texts], body.add_special_tokens))

    @app.post("/tokenize", response_model=None)
    async def tokenize_route(body: TokenizeRequest) -> JSONResponse:
        return await admission["/tokenize"].run(tei_tokenize, body)

    @app.get("/info")
    def tei_info() -> dict[str, Any]:
        info = served()
        return {
            "model_id": str(info.get("model")),
            "model_sha": None,
            "model_dtype": "float32",
            "model_type": {"embedding": {"pooling": pooling_of(str(info.get("model_path") or ""))}},
            "max_concurrent_requests": settings.route_concurrency,
            "max_input_length": int(info.get("max_seq_length") or 0),
            "max_client_batch_size": MAX_INPUTS,
            "auto_truncate": False,
            "prompts": info.get("prompts") or {},
            "dimension": info.get("dimension"),
            "version": app.version,
        }

    @app.get("/health", response_model=None)
    def tei_health() -> Response:
        try:
            model().encode("ready", timeout=READY_TIMEOUT)
        except errors.ShmModelError as exc:
            return error_response(503, exc.code, f"not ready: {exc}", path="/health")
        return Response(status_code=200)

    # --- search and chat -------------------------------------------------------------------------

    def find(body: SearchRequest) -> JSONResponse:
        finder = retriever()
        finder.check_model()
        hits = finder.search(body.query, k=body.k, mode=body.mode)
        results, truncated = citations(hits)
        return JSONResponse({"query": body.query, "mode": body.mode, "results": results, "truncated": truncated})

    @app.post("/search", response_model=None)
    async def search(body: SearchRequest) -> JSONResponse:
        if not body.query.strip():
            raise errors.BadRequest("query: only whitespace")
        return await admission["/search"].run(find, body)

    def answer(body: ChatRequest) -> JSONResponse | StreamingResponse:
        finder = retriever()
        finder.check_model()
        hits = finder.search(body.question, k=body.k, mode=body.mode)
        sources, truncated = citations(hits)
        hits = hits[: len(sources)]
        generated = bool(settings.chat_base) and bool(hits)
        if not hits:
            pieces: Iterator[str] = iter(["관련 문서를 찾지 못했습니다. (No matching passages in the documents.)"])
        elif generated:
            pieces = llm_answer(settings.chat_endpoint(), body.question, hits)
        else:
            pieces = iter([extractive_answer(body.question, hits)])
        kind = "generated" if generated else "extracted"
        if not body.stream:
            return JSONResponse(
                {
                    "question": body.question,
                    "answer": "".join(pieces),
                    "answer_type": kind,
                    "sources": sources,
                    "truncated": truncated,
                }
            )

        def events() -> Iterator[str]:
            head = json.dumps({"answer_type": kind, "sources": sources, "truncated": truncated}, ensure_ascii=False)
            yield f"event: sources\ndata: {head}\n\n"
            try:
                for piece in pieces:
                    yield f"data: {json.dumps({'delta': piece}, ensure_ascii=False)}\n\n"
            except errors.ShmModelError as exc:
                yield f"event: error\ndata: {json.dumps({'code': exc.code, 'message': exc.message})}\n\n"
            yield "event: done\ndata: {}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/chat", response_model=None)
    async def chat(body: ChatRequest) -> JSONResponse | StreamingResponse:
        if not body.question.strip():
            raise errors.BadRequest("question: only whitespace")
        return await admission["/chat"].run(answer, body)

    # --- documents -------------------------------------------------------------------------------

    def store_uploads(files: list[UploadFile]) -> tuple[str, list[str], dict[str, str]]:
        """Each file in a folder of its own (same names never collide; the stored file keeps the
        uploader's name, shortened, for citations). Returns the folder, the paths, their names."""
        folder = tempfile.mkdtemp(prefix="upload-", dir=_ensure(settings.upload_dir))
        try:
            saved, names = [], {}
            for n, upload_file in enumerate(files):
                name = _safe_name(upload_file.filename or "")
                if Path(name).suffix.lower() not in SUPPORTED:
                    raise errors.BadRequest(f"{name}: unsupported file type; supported: {', '.join(SUPPORTED)}")
                path = Path(folder) / str(n) / name
                path.parent.mkdir()
                with open(path, "wb") as out:
                    upload_file.file.seek(0)
                    shutil.copyfileobj(upload_file.file, out, 1 << 20)
                saved.append(str(path))
                names[os.path.realpath(path)] = name
            return folder, saved, names
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @app.post("/documents", status_code=202)
    async def upload(files: list[UploadFile] = File(...)) -> dict[str, Any]:  # noqa: B008 (FastAPI's idiom)
        if not files:
            raise errors.BadRequest("no files in the upload")
        jobs: Jobs = state["jobs"]
        jobs.check_room()
        folder, saved, names = await anyio.to_thread.run_sync(store_uploads, files)
        try:
            job = jobs.submit(saved, folder=folder, names=names)
        except errors.Overloaded:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"job": job.id, "status_url": f"/documents/jobs/{job.id}", "files": list(names.values())}

    @app.get("/documents/jobs/{job_id}")
    def job_status(job_id: str) -> JSONResponse:
        job = state["jobs"].jobs.get(job_id)
        if job is None:
            return error_response(404, "not_found", f"no ingestion job {job_id[:40]!r}")
        return JSONResponse(job.to_dict())

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (ROOT / "static" / "chat.html").read_text(encoding="utf-8")

    app.state.settings = settings
    app.state.values = state
    return app


def _ensure(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    return folder


# --- the server ------------------------------------------------------------------------------------


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers: a connection that has
    not sent a whole request head ``seconds`` after it opened (or after its last response) is
    closed. uvicorn has no such timeout; without it, slow-header clients hold connections forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            armed = self.cycle
            self._header_timer = self.loop.call_later(seconds, self._expire, armed)

        def _expire(self, armed: object) -> None:
            self._header_timer = None
            idle = armed is None or armed.response_complete  # type: ignore[attr-defined]
            if self.cycle is armed and idle and not self.transport.is_closing():
                self.transport.close()  # no request head since it was armed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11


def _raise_open_files_limit(wanted: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(settings: Settings, log_level: str | None = None) -> int:
    """Run the app under uvicorn on ``settings.host:settings.port``; its log lines go through
    ``shm_model.logs`` (text or JSON, with role and pid)."""
    import uvicorn

    from shm_model.logs import setup

    settings.check_bind()
    setup(log_level, role="api")
    _raise_open_files_limit(settings.limit_concurrency + 256)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=logging.getLogger().level,
        access_log=False,
        http=header_timeout_protocol(settings.header_timeout),
        timeout_keep_alive=settings.keep_alive,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=settings.limit_concurrency,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="shm-model-api",
        description="Serve the chat (RAG) API on the shared model host (uvicorn). Options override the "
        "environment; everything else comes from the variables below.",
        epilog=_SettingsHelp.MARK,
        formatter_class=_SettingsHelp,
    )


class _SettingsHelp(argparse.RawDescriptionHelpFormatter):
    """Builds the settings list only when --help prints it."""

    MARK = "(settings)"

    def add_text(self, text: str | None) -> None:
        super().add_text(settings_help() if text == self.MARK else text)


def main(argv: list[str] | None = None) -> int:
    """``shm-model-api`` (also ``python api_server.py``, ``python -m api_server`` and ``shm-model api``)."""
    parser = build_parser()
    parser.add_argument("--host", default=None, help="address (default: API_HOST)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: API_PORT)")
    parser.add_argument("--log-level", default=None, choices=config_settings.LOG_LEVELS,
                        help="default: SHM_MODEL_LOG_LEVEL")  # fmt: skip
    args = parser.parse_args(argv)
    given = {name: value for name, value in (("host", args.host), ("port", args.port)) if value is not None}
    try:
        return serve(Settings.load(**given), args.log_level)
    except errors.ConfigError as exc:
        print(f"shm-model-api: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


__all__ = ["Settings", "create_app", "main", "serve", "settings_help"]

if __name__ == "__main__":
    sys.exit(main())
