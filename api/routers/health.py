"""Health, status and metrics: ``/health/live``, ``/health/ready``, ``/model/status``, ``/metrics``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from api.errors import error_response
from api.state import AppStateDep
from shm_model import errors
from shm_model.manager import ModelManager

#: Seconds one readiness encode may take.
READY_TIMEOUT = 2.0

router = APIRouter()


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}  # on the event loop: it answers while every thread is busy


@router.get("/health/ready")
def ready(api: AppStateDep) -> JSONResponse:
    """200 while the model encodes: ``ready``, or ``degraded`` with the host's reasons (memory pressure,
    workers below target, error rate, p99) while it serves with less; 503 when it cannot encode."""
    started = time.perf_counter()
    try:
        api.model().encode("ready", timeout=READY_TIMEOUT)
    except errors.ShmModelError as exc:
        return error_response(503, exc.code, f"not ready: {exc}")
    encode_ms = round((time.perf_counter() - started) * 1000, 1)
    reasons = ((api.manager.host_status() or {}).get("health") or {}).get("reasons") or {}
    if reasons:
        return JSONResponse({"status": "degraded", "reasons": reasons, "encode_ms": encode_ms})
    return JSONResponse({"status": "ready", "encode_ms": encode_ms})


@router.get("/model/status")
def model_status(api: AppStateDep) -> dict[str, Any]:
    manager: ModelManager = api.manager
    status = manager.get_status().to_dict()
    status["host"] = manager.host_status()
    return status


@router.get("/metrics")
def metrics(api: AppStateDep) -> PlainTextResponse:
    from prometheus_client import generate_latest

    from shm_model import metrics as m

    api.manager.host_status()  # refreshes the host's gauges
    return PlainTextResponse(generate_latest(m.REGISTRY).decode(), media_type="text/plain; version=0.0.4")
