"""Prometheus metrics of the model in this process, in one registry an API server can expose."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

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
HOST_UP = Gauge("shm_model_host_up", "1 when the model host answered the last status probe, else 0", registry=REGISTRY)
HOST_DEGRADED = Gauge(
    "shm_model_host_degraded",
    "1 while the host is degraded for this reason (memory_pressure, workers_below_target, error_rate, latency)",
    ["reason"],
    registry=REGISTRY,
)
HOST_MEMORY_HEADROOM = Gauge(
    "shm_model_host_memory_headroom_bytes",
    "Memory the host can still take: the least of RAM available, room in its cgroup and under SHM_MODEL_MEMORY_LIMIT",
    registry=REGISTRY,
)
HOST_MEMORY_CEILING = Gauge(
    "shm_model_host_memory_ceiling_bytes",
    "The most the host may use: the least of RAM, its cgroup's limit and SHM_MODEL_MEMORY_LIMIT",
    registry=REGISTRY,
)
HOST_MEMORY_PSI = Gauge(
    "shm_model_host_memory_psi", "Memory pressure stall information, 'some avg10' in percent", registry=REGISTRY
)


class _Restarts(Collector):
    """Workers the host replaced, by cause: a counter whose values come from the host's status."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "shm_model_host_worker_restarts",
            "Workers of the host that died and were replaced, by cause (oom_kill, watchdog, crash)",
            labels=["cause"],
        )
        for cause, count in sorted(self.counts.items()):
            family.add_metric([cause], count)
        yield family


HOST_RESTARTS = _Restarts()
REGISTRY.register(HOST_RESTARTS)
