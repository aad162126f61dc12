"""What the host says about itself: ``info`` (the model), and ``status`` (workers, queue,
memory, counters) for ``shm-model status``, the API's ``/model/status`` and ``/metrics``.

``status`` is built in two steps: a snapshot of the host's own state, taken on the event
loop (cheap, consistent), then the memory figures of every process (psutil reads each
process's smaps: milliseconds for a large model), added off the loop so that a status or
metrics scrape never delays a request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from shm_model.host.pool import WorkerHandle
from shm_model.memory import process_memory, sum_figures
from shm_model.protocol import PRIORITIES
from shm_model.scheduling import Scheduler

MODEL_FIELDS = (
    "model",
    "model_path",
    "alias",
    "dimension",
    "max_seq_length",
    "device",
    "dtype",
    "linear_kernel",
    "forward",
    "prompts",
)


def info(meta: dict[str, Any], generation: int) -> dict[str, Any]:
    """The default model's fields, and ``models``: every served model's (the first is the default)."""
    models = [{key: model.get(key) for key in MODEL_FIELDS} for model in meta.get("models") or [meta]]
    return {
        "model": meta.get("model"),
        "model_path": meta.get("model_path"),
        "dimension": meta.get("dimension"),
        "max_seq_length": meta.get("max_seq_length"),
        "device": meta.get("device"),
        "prompts": meta.get("prompts", {}),
        "models": models,
        "generation": generation,
        "pid": os.getpid(),
    }


def worker_rows(workers: Iterable[WorkerHandle]) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {
            "pid": w.pid,
            "generation": w.generation,
            "state": w.state.value,
            "requests_served": w.requests_served,
            "batches": w.batches,
            "texts": w.texts,
            "threads": w.threads,
            "paused": w.paused_since is not None,  # its bulk batch lent its cores to a query
            "uptime_s": round(now - w.started, 3),
        }
        for w in sorted(workers, key=lambda w: w.pid)
    ]


def _percentiles(samples_ms: np.ndarray) -> dict[str, Any]:
    if not samples_ms.size:
        return {"p50": None, "p99": None, "max": None, "samples": 0}
    return {
        "p50": round(float(np.percentile(samples_ms, 50)), 3),
        "p99": round(float(np.percentile(samples_ms, 99)), 3),
        "max": round(float(samples_ms.max()), 3),
        "samples": int(samples_ms.size),
    }


def queue_report(scheduler: Scheduler, bulk_batch_ms: float) -> dict[str, Any]:
    """Per priority class: what waits now, and how long admitted requests waited for a worker."""
    depth = scheduler.depth()
    report: dict[str, Any] = {}
    for priority in PRIORITIES:
        stats = scheduler.stats[priority]
        report[priority] = {
            **depth[priority],
            "served_requests": stats.requests,
            "batches": stats.batches,
            "texts_served": stats.texts,
            "tokens_served": stats.tokens,
            "wait_ms": _percentiles(np.asarray(stats.waits, dtype=np.float64) * 1000.0),
            "batch_ms": _percentiles(np.asarray(stats.batch_seconds, dtype=np.float64) * 1000.0),
        }
    report["bulk_batch_ms"] = bulk_batch_ms
    # The budget of the latest bulk batch: bulk_batch_ms once per layer while a bulk batch runs
    # alone (a worker free for queries) and pauses between layers for them.
    report["bulk_batch_budget_ms"] = round(scheduler.bulk_batch_seconds * 1000.0, 1)
    # 0: interactive batches are not cut by time (SHM_MODEL_QUERY_BATCH_MS=0)
    report["query_batch_ms"] = round((scheduler.query_batch_seconds or 0.0) * 1000.0, 1)
    report["ms_per_1k_padded_tokens"] = {
        str(threads): round(rate * 1e6, 3) for threads, rate in sorted(scheduler.rates.items())
    }
    return report


def add_memory(status: dict[str, Any]) -> dict[str, Any]:
    """Fill in RSS, PSS and USS of the host and each worker, and their sums (off the event loop)."""
    own = process_memory(os.getpid()) or {"rss": 0, "pss": 0, "uss": 0}
    figures = [own]
    for row in status["workers"]:
        worker = process_memory(row["pid"])
        if worker:
            row.update(worker)
            figures.append(worker)
    status["supervisor"] = {"pid": os.getpid(), **own}
    status["memory"] = sum_figures(figures)
    return status
