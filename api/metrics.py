"""Per-route HTTP metrics, counted for every answer (the middlewares' refusals included)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from prometheus_fastapi_instrumentator.metrics import Info as RequestInfo

from shm_model.metrics import REGISTRY

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
