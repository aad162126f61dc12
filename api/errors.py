"""Errors to HTTP, in one place: the status of each typed error, the body in OpenAI's shape (or
TEI's on TEI's routes), and the app's exception handlers."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from shm_model import errors
from tablerag.store import ModelMismatch, StoreError

log = logging.getLogger(__name__)

#: Routes that answer errors in TEI's shape ({"error": "...", "error_type": "..."}).
TEI_ROUTES = ("/embed", "/tokenize", "/info", "/health")
#: An error message is cut to this many characters (it never echoes the input).
MAX_MESSAGE_CHARS = 300


STATUS = {
    errors.ModelNotFound: 404,
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


async def shm_error(request: Request, exc: errors.ShmModelError) -> JSONResponse:
    status = status_for(exc)
    headers = {"Retry-After": "1"} if status == 429 else None
    if status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    param = exc.details.get("param")
    param = param if isinstance(param, str) else None
    return error_response(status, exc.code, exc.message, headers, path=request.url.path, param=param)


async def body_refused(request: Request, exc: BodyRefused) -> JSONResponse:
    return exc.response(request.url.path)


async def mismatch(request: Request, exc: ModelMismatch) -> JSONResponse:
    return error_response(409, "model_mismatch", str(exc), path=request.url.path)


async def store_error(request: Request, exc: StoreError) -> JSONResponse:
    return error_response(503, "store_unavailable", str(exc), path=request.url.path)


def problem(error: dict[str, Any]) -> str:
    """One validation error in a line: where, then what."""
    if error.get("type") == "json_invalid":  # loc is ("body", the character the parser stopped at)
        reason = str(error.get("ctx", {}).get("error", ""))[:200]
        return f"the body is not valid JSON at character {error['loc'][-1]}: {reason}"
    where = ".".join(str(p) for p in error["loc"] if p != "body")[:40] or "body"
    return f"{where}: {str(error['msg'])[:200]}"


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    found = exc.errors()
    problems = "; ".join(problem(e) for e in found[:3])
    if len(found) > 3:
        problems += f" (and {len(found) - 3} more)"
    return error_response(422, "bad_request", problems, path=request.url.path)


def install(app: FastAPI) -> None:
    """The exception handlers that answer errors with these responses."""
    app.add_exception_handler(errors.ShmModelError, shm_error)  # type: ignore[arg-type]
    app.add_exception_handler(BodyRefused, body_refused)  # type: ignore[arg-type]
    app.add_exception_handler(ModelMismatch, mismatch)  # type: ignore[arg-type]
    app.add_exception_handler(StoreError, store_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
