"""Prometheus metrics of the model in this process, in one registry an API server can expose."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

LOAD_SECONDS = Gauge(
    "shm_model_load_seconds",
    "Seconds the model took to load, by path (shared: in the host)",
    ["path"],
    registry=REGISTRY,
)
MEMORY_BYTES = Gauge(
    "shm_model_memory_bytes",
    "Memory in use, by scope (process: this process; host: the host's process tree) and kind (rss, pss, uss)",
    ["scope", "kind"],
    registry=REGISTRY,
)
HOST_WORKERS = Gauge("shm_model_host_workers", "Workers of the host", registry=REGISTRY)
HOST_QUEUE_DEPTH = Gauge("shm_model_host_queue_depth", "Requests in flight at the host", registry=REGISTRY)
HOST_QUEUE_WAITING = Gauge(
    "shm_model_host_queue_waiting",
    "Requests waiting for a worker at the host, by priority class",
    ["priority"],
    registry=REGISTRY,
)
HOST_QUEUE_WAIT_SECONDS = Gauge(
    "shm_model_host_queue_wait_seconds",
    "Time the host's recent requests waited for a worker, by priority class and quantile (0.5, 0.99)",
    ["priority", "quantile"],
    registry=REGISTRY,
)
REQUESTS = Counter(
    "shm_model_requests_total",
    "Model operations, by op and path (shared or local)",
    ["op", "path"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "shm_model_request_seconds",
    "Latency of model operations, by op and path",
    ["op", "path"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
ERRORS = Counter("shm_model_errors_total", "Errors, by type", ["type"], registry=REGISTRY)
FALLBACKS = Counter(
    "shm_model_fallbacks_total", "Requests served by a local model because no host answered", registry=REGISTRY
)
