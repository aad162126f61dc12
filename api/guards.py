"""The front door: ASGI middleware that bounds every request body by bytes and time
(``BodyLimit``), refuses cross-site state changes and requests without the API key (``Guard``),
and ``Admission``, each route's bound on model calls in progress."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from fastapi.responses import JSONResponse

from api.errors import BodyRefused, error_response
from api.settings import Settings
from config.settings import host_pattern
from shm_model import errors


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
