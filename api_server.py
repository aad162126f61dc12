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

This module assembles the app (``create_app``) and runs it (``serve``, ``main``); the routes,
one router per area, and what they share are in the ``api`` package (its docstring lists them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from api import errors as api_errors
from api.guards import Admission, BodyLimit, Guard
from api.metrics import observe_http
from api.routers import documents, health, openai, page, rag, tei
from api.settings import Settings, settings_help
from api.state import AppState, lifespan
from config import settings as config_settings
from shm_model import errors
from shm_model.metrics import REGISTRY

#: Largest incomplete HTTP event (request line and headers) uvicorn's h11 buffers.
MAX_HEADER_BYTES = 16 << 10


# --- the app ---------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.load()
    admission = {
        name: Admission(name, settings.route_concurrency)
        for name in ("/v1/embeddings", "/embed", "/tokenize", "/search", "/chat")
    }
    app = FastAPI(title="shm-model RAG API", version="1.0", lifespan=lifespan)
    app.state.api = AppState(settings=settings, admission=admission)

    # The last one added runs first: Host, then origin and key, then the body.
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(Guard, settings=settings)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    # Outermost: every answer is counted, refusals by the middlewares above included.
    Instrumentator(should_group_status_codes=False, registry=REGISTRY).add(observe_http).instrument(app)

    api_errors.install(app)
    for area in (health, openai, tei, rag, documents, page):
        app.include_router(area.router)
    return app


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
