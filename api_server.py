"""The chat (RAG) API server on the shared model host.

Endpoints: ``POST /chat`` (answer with citations: from an OpenAI-compatible chat model when
one is configured, else extracted from the best passages and table rows), ``POST /search``,
``POST /documents`` + ``GET /documents/jobs/{id}`` (ingestion by a ``rag_with_tables.py``
subprocess that uses the host), ``POST /v1/embeddings`` + ``GET /v1/models``
(OpenAI-compatible), ``GET /model/status``, ``GET /health/live``, ``GET /health/ready``,
``GET /metrics`` and ``GET /`` (a chat page).

Run it with ``shm-model api`` (uvicorn) next to ``shm-model serve``. Settings come from the
environment: ``RAG_DB``, ``API_HOST``/``API_PORT``, ``API_MAX_BODY_BYTES``,
``API_UPLOAD_DIR``, ``CHAT_API_BASE``/``CHAT_API_KEY``/``CHAT_MODEL`` and the model
manager's ``SHM_MODEL_*``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from shm_model import errors
from shm_model.manager import ModelManager
from tablerag.chunking import location_label, split_sentences, terms
from tablerag.documents import SUPPORTED
from tablerag.retrieval import Mode, Retriever
from tablerag.store import Hit, ModelMismatch, Store, StoreError, open_store

log = logging.getLogger("api_server")

ROOT = Path(__file__).resolve().parent
MAX_INPUTS = 2048
READY_TIMEOUT = 2.0
#: Ingestion jobs remembered for GET /documents/jobs/{id}.
MAX_JOBS = 1000


@dataclass(frozen=True)
class Settings:
    db: str = field(default_factory=lambda: os.environ.get("RAG_DB", str(ROOT / "data" / "rag.sqlite3")))
    max_body_bytes: int = field(default_factory=lambda: int(os.environ.get("API_MAX_BODY_BYTES", str(50 << 20))))
    upload_dir: str = field(default_factory=lambda: os.environ.get("API_UPLOAD_DIR", str(ROOT / "data" / "uploads")))
    chat_base: str | None = field(default_factory=lambda: os.environ.get("CHAT_API_BASE") or None)
    chat_key: str = field(default_factory=lambda: os.environ.get("CHAT_API_KEY", ""))
    chat_model: str = field(default_factory=lambda: os.environ.get("CHAT_MODEL", ""))
    chat_timeout: float = field(default_factory=lambda: float(os.environ.get("CHAT_TIMEOUT", "60")))


# --- request and response bodies ----------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    k: int = Field(default=5, ge=1, le=100)
    mode: Mode = "hybrid"


class ChatRequest(BaseModel):
    question: str = Field(min_length=1, max_length=4000)
    k: int = Field(default=5, ge=1, le=20)
    mode: Mode = "hybrid"
    stream: bool = False


# --- errors to HTTP, in one place --------------------------------------------------------------

STATUS = {
    errors.PayloadTooLarge: 413,
    errors.BadRequest: 422,
    errors.Overloaded: 429,
    errors.HostUnavailable: 503,
    errors.PermissionDenied: 503,
    errors.ModelLoadError: 503,
    errors.RequestTimeout: 504,
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def status_for(exc: errors.ShmModelError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


class BodyLimit:
    """413 for a body over ``limit`` bytes: at once from Content-Length; a body without one
    (chunked) is read up to the limit first, then handed on."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        response = error_response(413, "payload_too_large", f"the body is over {self.limit} bytes")
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.disconnect"}


# --- ingestion jobs ----------------------------------------------------------------------------


@dataclass
class Job:
    id: str
    files: list[str]
    state: str = "queued"  # queued | running | done | failed
    done: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    chunks: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    message: str = ""

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
    """Ingestion subprocesses (``rag_with_tables.py ingest --events``), one at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._serial = threading.Lock()
        self._procs: set[subprocess.Popen[str]] = set()

    def submit(self, files: list[str]) -> Job:
        job = Job(uuid.uuid4().hex[:12], files)
        with self._lock:
            finished = [j.id for j in self.jobs.values() if j.finished is not None]
            for old in finished[: max(0, len(self.jobs) - MAX_JOBS + 1)]:
                del self.jobs[old]  # the oldest finished jobs make room
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), name=f"ingest-{job.id}", daemon=True).start()
        return job

    def _run(self, job: Job) -> None:
        with self._serial:
            job.state = "running"
            env = dict(os.environ, RAG_DB=self.settings.db)
            cmd = [sys.executable, str(ROOT / "rag_with_tables.py"), "ingest", "--events", *job.files]
            errors_file = tempfile.TemporaryFile(mode="w+")  # a pipe could fill up and stall the child
            try:
                proc = subprocess.Popen(
                    cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors_file, text=True,
                    stdin=subprocess.DEVNULL,
                )  # fmt: skip
            except OSError as exc:
                errors_file.close()
                job.state, job.message, job.finished = "failed", f"cannot start the ingestion: {exc}", time.time()
                return
            self._procs.add(proc)
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if event.get("event") == "file":
                        if event.get("error"):
                            job.errors[event["path"]] = event["error"]
                        else:
                            job.done.append(event["path"])
                            job.chunks += int(event.get("chunks", 0))
                code = proc.wait()
                errors_file.seek(0)
                stderr = errors_file.read()
            finally:
                self._procs.discard(proc)
                errors_file.close()
            job.finished = time.time()
            if code in (0, 1):
                job.state = "done"
                job.message = "some files failed" if job.errors else "ok"
            else:
                job.state = "failed"
                job.message = (stderr.strip().splitlines() or [f"exit status {code}"])[-1]

    def stop(self) -> None:
        for proc in list(self._procs):
            proc.kill()


# --- answers -------------------------------------------------------------------------------------


def citation(n: int, hit: Hit) -> dict[str, Any]:
    return {
        "n": n,
        "document": os.path.basename(hit.path),
        "location": location_label(hit.location),
        "kind": hit.kind,
        "score": round(hit.score, 4),
        "text": hit.text,
        "row": hit.row,
        "table": hit.table_markdown if hit.kind in ("row", "table") else None,
        "caption": hit.table_caption,
    }


def extractive_answer(question: str, hits: list[Hit]) -> str:
    """The best passage, and the next ones only when they match the question as well: table
    rows as they are, and from text the sentence sharing most terms with the question."""
    wanted = set(terms(question))
    parts: list[str] = []
    best_overlap = len(wanted & set(terms(hits[0].text))) if hits else 0
    for n, hit in enumerate(hits[:3], start=1):
        if n > 1 and len(wanted & set(terms(hit.text))) < best_overlap:
            continue  # only as good a match as the best one
        if hit.row:
            parts.append(", ".join(f"{h}: {v}" for h, v in hit.row.items()) + f" [{n}]")
        elif hit.kind == "table":
            lines = [line for line in hit.text.splitlines() if line.startswith("|") and "---" not in line]
            best = max(lines[1:] or lines, key=lambda line: len(wanted & set(terms(line))))
            parts.append(f"{lines[0]}\n{best} [{n}]" if lines[1:] else f"{best} [{n}]")
        else:
            body = hit.text.split("\n", 1)[-1]
            sentences = split_sentences(body) or [body]
            best = max(sentences, key=lambda s: len(wanted & set(terms(s))))
            parts.append(f"{best} [{n}]")
    return "\n".join(parts)


def context_block(hits: list[Hit]) -> str:
    blocks = []
    for n, hit in enumerate(hits, start=1):
        where = location_label(hit.location)
        body = hit.text if not hit.row else hit.text + ("\n" + hit.table_markdown if hit.table_markdown else "")
        blocks.append(f"[{n}] {os.path.basename(hit.path)}{' (' + where + ')' if where else ''}\n{body}")
    return "\n\n".join(blocks)


def llm_answer(settings: Settings, question: str, hits: list[Hit]) -> Iterator[str]:
    """Stream the answer of an OpenAI-compatible chat endpoint, grounded in the passages."""
    import httpx

    messages = [
        {
            "role": "system",
            "content": "Answer in the language of the question, only from the numbered sources, and cite them "
            "like [1]. If the sources do not contain the answer, say so.",
        },
        {"role": "user", "content": f"Sources:\n{context_block(hits)}\n\nQuestion: {question}"},
    ]
    body = {"model": settings.chat_model, "messages": messages, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {settings.chat_key}"} if settings.chat_key else {}
    url = settings.chat_base.rstrip("/") + "/chat/completions"  # type: ignore[union-attr]
    with httpx.stream("POST", url, json=body, headers=headers, timeout=settings.chat_timeout) as response:
        if response.status_code != 200:
            raise errors.HostUnavailable(f"the chat model at {settings.chat_base} answered {response.status_code}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            delta = json.loads(data)["choices"][0].get("delta", {}).get("content")
            if delta:
                yield delta


# --- the app ---------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["manager"] = ModelManager.get_instance()
        state["jobs"] = Jobs(settings)
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

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(errors.ShmModelError)
    async def shm_error(request: Request, exc: errors.ShmModelError) -> JSONResponse:
        status = status_for(exc)
        headers = {"Retry-After": "1"} if status == 429 else None
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(status, exc.code, exc.message, headers)

    @app.exception_handler(ModelMismatch)
    async def mismatch(request: Request, exc: ModelMismatch) -> JSONResponse:
        return error_response(409, "model_mismatch", str(exc))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return error_response(503, "store_unavailable", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return error_response(422, "bad_request", problems)

    # --- health, status, metrics ---------------------------------------------------------

    @app.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "ok"}

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

    # --- embeddings (OpenAI-compatible) --------------------------------------------------------

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        info = model().describe()
        return {
            "object": "list",
            "data": [{"id": str(info["model"]), "object": "model", "created": 0, "owned_by": "shm-model"}],
        }

    @app.post("/v1/embeddings")
    def embeddings(body: EmbeddingsRequest) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise errors.BadRequest("input must not be empty")
        if len(texts) > MAX_INPUTS:
            raise errors.BadRequest(f"input has {len(texts)} items; at most {MAX_INPUTS}")
        for i, text in enumerate(texts):
            if not text:
                raise errors.BadRequest(f"input[{i}] is an empty string")
        vectors = np.asarray(model().encode(texts, normalize_embeddings=True), dtype=np.float32)
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                embedding: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            else:
                embedding = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(t.encode("utf-8")) // 3 + 2 for t in texts)
        return {
            "object": "list",
            "data": data,
            "model": str(model().describe()["model"]),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # --- search and chat -------------------------------------------------------------------------

    @app.post("/search")
    def search(body: SearchRequest) -> dict[str, Any]:
        if not body.query.strip():
            raise errors.BadRequest("query: only whitespace")
        finder = retriever()
        finder.check_model()
        hits = finder.search(body.query, k=body.k, mode=body.mode)
        return {"query": body.query, "mode": body.mode, "results": [citation(n, h) for n, h in enumerate(hits, 1)]}

    @app.post("/chat", response_model=None)
    def chat(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        if not body.question.strip():
            raise errors.BadRequest("question: only whitespace")
        finder = retriever()
        finder.check_model()
        hits = finder.search(body.question, k=body.k, mode=body.mode)
        sources = [citation(n, h) for n, h in enumerate(hits, 1)]
        generated = bool(settings.chat_base) and bool(hits)
        if not hits:
            pieces: Iterator[str] = iter(["관련 문서를 찾지 못했습니다. (No matching passages in the documents.)"])
        elif generated:
            pieces = llm_answer(settings, body.question, hits)
        else:
            pieces = iter([extractive_answer(body.question, hits)])
        kind = "generated" if generated else "extracted"
        if not body.stream:
            return {"question": body.question, "answer": "".join(pieces), "answer_type": kind, "sources": sources}

        def events() -> Iterator[str]:
            head = json.dumps({"answer_type": kind, "sources": sources}, ensure_ascii=False)
            yield f"event: sources\ndata: {head}\n\n"
            try:
                for piece in pieces:
                    yield f"data: {json.dumps({'delta': piece}, ensure_ascii=False)}\n\n"
            except errors.ShmModelError as exc:
                yield f"event: error\ndata: {json.dumps({'code': exc.code, 'message': exc.message})}\n\n"
            yield "event: done\ndata: {}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # --- documents -------------------------------------------------------------------------------

    @app.post("/documents", status_code=202)
    async def upload(files: list[UploadFile] = File(...)) -> dict[str, Any]:  # noqa: B008 (FastAPI's idiom)
        if not files:
            raise errors.BadRequest("no files in the upload")
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=_ensure(settings.upload_dir)))
        saved = []
        for upload_file in files:
            name = _safe_name(upload_file.filename or "")
            if Path(name).suffix.lower() not in SUPPORTED:
                raise errors.BadRequest(f"{name}: unsupported file type; supported: {', '.join(SUPPORTED)}")
            path = folder / name
            with open(path, "wb") as out:
                while chunk := await upload_file.read(1 << 20):
                    out.write(chunk)
            saved.append(str(path))
        job = state["jobs"].submit(saved)
        return {"job": job.id, "status_url": f"/documents/jobs/{job.id}", "files": [Path(p).name for p in saved]}

    @app.get("/documents/jobs/{job_id}")
    def job_status(job_id: str) -> JSONResponse:
        job = state["jobs"].jobs.get(job_id)
        if job is None:
            return error_response(404, "not_found", f"no ingestion job {job_id!r}")
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


def _safe_name(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/")).strip()
    base = re.sub(r"[\x00-\x1f]", "", base)
    if not base or base in (".", ".."):
        raise errors.BadRequest("an uploaded file has no usable name")
    return base[:200]


def serve(host: str, port: int, log_level: str) -> int:
    """Run the app under uvicorn (``shm-model api`` parses the options)."""
    import uvicorn

    from shm_model.logs import setup

    setup(log_level, role="api")
    uvicorn.run(create_app(), host=host, port=port, log_level=log_level, access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python api_server.py [options]`` is ``shm-model api [options]``."""
    from shm_model.cli import main as cli

    return cli(["api", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["Settings", "create_app", "main", "serve"]

if __name__ == "__main__":
    sys.exit(main())
