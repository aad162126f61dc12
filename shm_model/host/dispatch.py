"""Requests from admission to answer: the queue, batches on workers, and what comes back.

``submit`` admits an encode request (bounded by ``queue_size``: SHM_MODEL_QUEUE_SIZE, less under
memory pressure, as the padded-token cap of ``scheduler.limits``), cuts it into
pieces (``shm_model.scheduling``) and arms its deadline. ``dispatch`` hands batches to idle
workers of the serving generation while there are cores for them; ``_exchange`` sends a
batch, reads the reply and puts each piece's vectors in place. A request is answered once,
when its last piece arrives, its deadline passes, or a piece fails: a failed batch is
retried piece by piece alone (after a crash up to ``SHM_MODEL_CRASH_RETRIES`` times), and a
batch whose worker was aborted by the watchdog fails with ``RequestTimeout``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from config.model_config import HostConfig
from shm_model.errors import (
    BadRequest,
    HostUnavailable,
    InternalError,
    ModelNotFound,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    ShmModelError,
    WorkerCrashed,
)
from shm_model.host.connections import Connection
from shm_model.host.pool import WorkerHandle, WorkerPool
from shm_model.protocol import (
    ConnectionClosed,
    error_reply,
    optional_bool,
    optional_str,
    pack,
    read_frame,
    request_priority,
    request_timeout,
    token_counts,
    too_long,
    validate_texts,
    vectors_from_frame,
    vectors_reply,
)
from shm_model.scheduling import BatchLimits, CoreShare, Piece, Request, Scheduler, split

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTH = 512
#: Seconds after an interactive request during which bulk batches leave a worker free for the next one.
QUERY_WINDOW = 5.0


class Dispatcher:
    def __init__(
        self,
        cfg: HostConfig,
        pool: WorkerPool,
        *,
        cores: int,
        background: Callable[[Coroutine[Any, Any, Any]], None],
        changed: Callable[[], None],
        counters: collections.Counter[str],
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.cores = cores
        self.background = background
        self.changed = changed
        self.counters = counters
        self.meta: dict[str, Any] = {}  # the serving models: see ``set_models``
        self.models: dict[str, dict[str, Any]] = {}  # served name or configured alias -> model
        self.threads = 1  # intra-op threads of a batch when they are fixed
        self.dynamic_threads = False  # each batch takes the cores no busy worker holds
        self.pausable = False  # bulk batches pause between layers for a query (forked workers)
        self.bulk_wait_seconds = cfg.bulk_batch_ms / 1000.0  # how long a query may wait behind bulk work
        self.pause_points = 1  # layers of the serving models (the fewest): see ``_set_bulk_budget``
        self.workers = 1
        self.bulk_alone_seconds = self.bulk_wait_seconds  # a bulk batch's budget while it leaves a worker free
        self.last_query = float("-inf")  # loop time the last interactive request arrived
        self.core_share = CoreShare(cores, 1)
        self.scheduler = Scheduler(
            BatchLimits(max_texts=cfg.max_batch_size, max_tokens=cfg.max_batch_tokens, max_bytes=cfg.max_frame_bytes),
            bulk_share=cfg.bulk_share,
            bulk_batch_seconds=self.bulk_wait_seconds,
            query_batch_seconds=cfg.query_batch_ms / 1000.0 if cfg.query_batch_ms > 0 else None,
            on_expired=self.expire,
        )
        self.requests: set[Request] = set()
        self._batch_ids = itertools.count(1)
        self.queue_size = cfg.queue_size
        #: told of every answered request: (now, ok, seconds since admission); the caller's bad requests aside
        self.on_answer: Callable[[float, bool, float], None] | None = None

    def set_capacity(self, *, max_batch_tokens: int, queue_size: int) -> None:
        """Smaller batches and a shorter queue under memory pressure (and back)."""
        self.queue_size = queue_size
        if self.scheduler.limits.max_tokens != max_batch_tokens:
            self.scheduler.limits = dataclasses.replace(self.scheduler.limits, max_tokens=max_batch_tokens)

    def configure(self, *, workers: int, threads: int, dynamic: bool, pausable: bool = False) -> None:
        """``pausable``: the workers are forked and can pause a batch between layers."""
        self.threads, self.dynamic_threads, self.workers = threads, dynamic, workers
        self.pausable = pausable and dynamic and self.cfg.pause_bulk
        self.core_share = CoreShare(self.cores, workers)
        self._set_bulk_budget()

    def _set_bulk_budget(self) -> None:
        """A bulk batch's time budget: how long a query may wait behind bulk work
        (``SHM_MODEL_BULK_BATCH_MS``). When bulk batches pause for queries and a bulk batch
        runs alone, leaving a worker free (``_bulk_alone``), a query waits only for the running
        layer, so the batch may take the budget once per layer: on the KURE-shaped model (24
        layers) a 250 ms batch holds one sentence, and one input of short sentences ran at
        4.3-4.4 sentences/s; with 24 x 250 ms, at 11.3-13.2. Bulk batches side by side keep the
        budget unscaled: a batch paused for a query holds its worker, so with every worker on
        bulk work a query waits for a whole batch (``benchmarks.mixed --quick``, bundled model:
        query p99 during an ingestion 408 ms with scaled batches side by side, 188 ms with a
        worker left free)."""
        points = self.pause_points if self.pausable and self.workers > 1 else 1
        self.bulk_alone_seconds = self.bulk_wait_seconds * points
        self.scheduler.bulk_batch_seconds = self.bulk_wait_seconds

    def set_models(self, meta: dict[str, Any]) -> None:
        """The serving generation's description: its default model's fields, and ``models``
        (each with dimension, max_seq_length, prompts, and the ``alias`` it was configured as)."""
        self.meta = meta
        self.models = {}
        for model in meta.get("models") or [meta]:
            for name in (model.get("model"), model.get("alias")):
                if isinstance(name, str) and name:
                    self.models.setdefault(name, model)
        points = [m.get("pause_points") for m in meta.get("models") or [meta]]
        self.pause_points = min(p if isinstance(p, int) and p >= 1 else 1 for p in points)  # unknown: 1
        self._set_bulk_budget()

    def model(self, name: str | None) -> dict[str, Any]:
        """A served model by name (None: the default)."""
        if name is None:
            return (self.meta.get("models") or [self.meta])[0]
        if name not in self.models:
            served = ", ".join(m["model"] for m in self.meta.get("models") or [self.meta])
            raise ModelNotFound(f"model {name!r:.200} is not served here; served: {served}", model=name)
        return self.models[name]

    def max_seq_length(self, model: str | None = None) -> int:
        return int(self.models.get(model or "", self.model(None)).get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH)

    # --- admission ------------------------------------------------------------------------

    @staticmethod
    def resolve_prompt(header: dict[str, Any], model: dict[str, Any]) -> str | None:
        prompt = optional_str(header, "prompt")
        name = optional_str(header, "prompt_name")
        if prompt is not None or name is None:
            return prompt
        prompts = model.get("prompts") or {}
        if name not in prompts:
            raise BadRequest(f"unknown prompt_name {name!r}; this model has: {', '.join(prompts) or 'none'}")
        return prompts[name]

    def submit(self, conn: Connection, rid: Any, header: dict[str, Any]) -> None:
        texts = validate_texts(header.get("texts"))
        model = self.model(optional_str(header, "model"))
        prompt = self.resolve_prompt(header, model)
        truncate = optional_bool(header, "truncate", True)
        priority = request_priority(header, len(texts))
        if priority == "interactive":
            self.last_query = asyncio.get_running_loop().time()
        timeout = min(request_timeout(header) or self.cfg.request_timeout, self.cfg.max_request_timeout)
        dim = int(model["dimension"])
        self.counters["requests"] += 1
        self.counters["texts"] += len(texts)
        if not texts:
            conn.send(vectors_reply(rid, np.empty((0, dim), dtype=np.float32), tokens=0))
            return
        if len(self.requests) >= self.queue_size:
            lowered = " under memory pressure" if self.queue_size < self.cfg.queue_size else ""
            raise Overloaded(
                f"the host has {len(self.requests)} requests in flight (limit {self.queue_size}{lowered}); retry later",
                limit=self.queue_size,
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        result = np.empty((len(texts), dim), dtype=np.float32)
        deadline = now + timeout
        req = Request(rid, conn, texts, prompt, priority, conn.pid, timeout, now, deadline, result, truncate=truncate)
        req.model = str(model["model"])
        req.prepare(self.max_seq_length(req.model))
        pieces = split(req, self.scheduler.limits)
        req.timer = loop.call_at(req.deadline, self.expire, req)
        self.requests.add(req)
        conn.requests.add(req)
        self.scheduler.push(pieces)
        self.dispatch()

    def abandon(self, conn: Connection) -> None:
        """Drop the queued work of a client that went away: nobody would read its vectors."""
        for req in list(conn.requests):
            if self._close(req):
                self.counters["abandoned"] += 1

    # --- answers --------------------------------------------------------------------------

    def expire(self, req: Request) -> None:
        if req.done:
            return
        self.counters["timeouts"] += 1
        self.fail(req, RequestTimeout(f"the request timed out after {req.timeout:.3g}s", timeout=req.timeout))

    def _close(self, req: Request) -> bool:
        """Mark a request answered; False if it already was."""
        if req.done:
            return False
        req.done = True
        if req.timer:
            req.timer.cancel()
        self.requests.discard(req)
        req.conn.requests.discard(req)
        self.scheduler.drop(req)
        self.changed()
        return True

    def finish(self, req: Request) -> None:
        if self._close(req):
            self._answered(req, ok=True)
            req.conn.send(vectors_reply(req.id, req.result, tokens=req.used_tokens))

    def fail(self, req: Request, error: ShmModelError) -> None:
        if self._close(req):
            self.counters[f"errors_{error.code}"] += 1
            if not isinstance(error, BadRequest):
                self._answered(req, ok=False)
            req.conn.send(error_reply(req.id, error))

    def _answered(self, req: Request, *, ok: bool) -> None:
        if self.on_answer is not None:
            now = asyncio.get_running_loop().time()
            self.on_answer(now, ok, now - req.arrived)

    def fail_all(self, error: ShmModelError) -> None:
        for req in list(self.requests):
            self.fail(req, error)

    # --- batches ----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand batches to idle workers of the serving generation, while there are cores for them.

        With threads on auto, a batch gets the cores no busy worker holds (``CoreShare``): all of
        them for a lone batch on a quiet host, a fair share on a busy one. A batch never starts
        on cores another batch holds, so threads never outnumber cores, with one exception that
        gives them back: an interactive batch may take the cores of a running bulk batch, which
        then waits between two of the model's layers until no interactive batch runs.
        """
        now = asyncio.get_running_loop().time()
        while self.scheduler.pending():
            idle = self.pool.idle()
            if not idle:
                break
            threads = self._threads_for_next(now, len(idle))
            if threads < 1 and self._pause_bulk(now):
                threads = self._threads_for_next(now, len(idle))
            if threads < 1:
                break  # the cores are held: the next batch starts when one is released
            pieces = self.scheduler.take(now, threads, ways=self._ways(len(idle), threads))
            if not pieces:
                break
            priority = pieces[0].request.priority
            if self.dynamic_threads and priority != "bulk" and not self.scheduler.pending(priority):
                threads = self.core_share.last(now, self._held())
            worker = idle[0]
            worker.assign(pieces, threads, priority)
            self.background(self._run_batch(worker, pieces))
        self._resume_bulk(now)

    def _pause_bulk(self, now: float) -> bool:
        """Lend the cores of running bulk batches to the interactive batch that is next."""
        if self.scheduler.next_priority() != "interactive":
            return False
        paused = False
        for w in self.pool.busy():
            if self._may_pause(w) and w.paused_since is None:
                w.set_paused(True, now)
                self.counters["bulk_pauses"] += 1
                paused = True
        return paused

    def _may_pause(self, w: WorkerHandle) -> bool:
        """Whether ``w``'s batch may be paused for a query (it then runs the model's eager
        layers, where the pause gate is)."""
        return self.cfg.pause_bulk and self.dynamic_threads and w.priority == "bulk" and w.pause is not None

    def _resume_bulk(self, now: float) -> None:
        """Let paused bulk batches go on once no interactive batch runs."""
        busy = self.pool.busy()
        if any(w.priority != "bulk" for w in busy):
            return
        for w in busy:
            if w.paused_since is not None:
                w.set_paused(False, now)

    def _ways(self, idle: int, threads: int) -> int:
        """How many batches will serve the waiting queries side by side: the interactive ones
        running, this one, and the idle workers the cores left beside it allow."""
        serving = sum(1 for w in self.pool.busy() if w.priority == "interactive")
        if not self.dynamic_threads:
            return serving + idle
        free = self.cores - self._held()
        return serving + min(idle, max(1, free // max(1, threads)))

    def _held(self) -> int:
        """Threads of the batches that run (a paused bulk batch holds none)."""
        return sum(w.threads for w in self.pool.busy() if w.paused_since is None)

    def _threads_for_next(self, now: float, idle: int) -> int:
        if not self.dynamic_threads:
            return self.threads
        busy = self.pool.busy()
        held = self._held()
        if self.scheduler.next_priority() == "bulk":
            alone = self._bulk_alone(now)
            self.scheduler.bulk_batch_seconds = self.bulk_alone_seconds if alone else self.bulk_wait_seconds
            if alone:
                return self.core_share.bulk(held, any(w.priority == "bulk" for w in busy))
        interactive = sum(1 for w in busy if w.priority != "bulk")
        return self.core_share.threads(now, held, interactive, idle, self.scheduler.queued_pieces())

    def _bulk_alone(self, now: float) -> bool:
        """Whether bulk batches run one at a time on every free core, so that a worker stays
        free for a query: on a large model (one bulk text takes longer than a query should wait,
        SHM_MODEL_BULK_BATCH_MS), and, while bulk batches pause for queries, for
        ``QUERY_WINDOW`` seconds after an interactive request arrived. Otherwise bulk batches
        share the cores side by side, which keeps more of their throughput."""
        if self.scheduler.bulk_text_over_budget(self.bulk_wait_seconds):
            return True
        return self.pausable and self.workers > 1 and now - self.last_query < QUERY_WINDOW

    async def _run_batch(self, w: WorkerHandle, pieces: list[Piece]) -> None:
        """Send one batch to a worker marked busy with it, and deliver what comes back."""
        try:
            await self._exchange(w, pieces)
        except Exception:
            log.exception("batch handling failed on worker %d; this is a bug", w.pid)
            for piece in pieces:
                self.fail(piece.request, InternalError("the host failed to handle this request"))
            self.pool.kill(w.pid)

    async def _exchange(self, w: WorkerHandle, pieces: list[Piece]) -> None:
        loop = asyncio.get_running_loop()
        batch_id = next(self._batch_ids)
        texts = [t for p in pieces for t in p.texts]
        padded = len(texts) * max(p.longest for p in pieces)
        self.pool.watch(w, max(p.request.deadline for p in pieces))
        started = loop.time()
        first = pieces[0].request
        header = {"op": "encode", "id": batch_id, "texts": texts, "prompt": first.prompt, "model": first.model}
        try:
            w.writer.write(pack({**header, "threads": w.threads, "pausable": self._may_pause(w)}))
            await w.writer.drain()
            frame = await read_frame(w.reader, self.pool.frame_limit)
        except (ConnectionClosed, ConnectionError, OSError, ShmModelError):
            self.pool.lost(w)
            return
        if w.batch is not pieces:  # lost meanwhile: its pieces were already requeued
            return
        paused = w.paused_seconds + (loop.time() - w.paused_since if w.paused_since is not None else 0.0)
        w.take_batch()
        if frame.header.get("id") != batch_id:
            log.error("worker %d answered batch %r for %d; this is a bug", w.pid, frame.header.get("id"), batch_id)
            self.batch_failed(pieces, InternalError("worker reply out of step"), crashed=True)
            self.pool.kill(w.pid)
            return
        w.batches += 1
        w.texts += len(texts)
        if frame.header.get("ok") is True:
            try:
                vectors = vectors_from_frame(frame)
                if vectors.shape[0] != len(texts):
                    raise ProtocolError(f"worker returned shape {vectors.shape} for {len(texts)} texts")
                tokens = token_counts(frame.header, len(texts))
            except ProtocolError as exc:
                self.batch_failed(pieces, InternalError(str(exc)), crashed=False)
            else:
                seconds = loop.time() - started - paused  # the time it ran, not the time it waited
                self.scheduler.observe(w.threads, padded, seconds, pieces[0].request.priority)
                self.deliver(w, pieces, vectors, tokens)
        else:
            self.batch_failed(pieces, ShmModelError.from_dict(frame.header.get("error")), crashed=False)
        self.pool.batch_done(w)
        self.dispatch()

    def deliver(self, w: WorkerHandle, pieces: list[Piece], vectors: np.ndarray, tokens: list[int]) -> None:
        """Put each piece's vectors in place; a request is answered when its last piece arrives.
        ``tokens`` (one count per text, before truncation) sum into the request's usage, or
        fail a request that refused truncation when one of its texts is over the length."""
        limit = self.max_seq_length(pieces[0].request.model)
        offset = 0
        for piece in pieces:
            req = piece.request
            rows = vectors[offset : offset + piece.count]
            counts = tokens[offset : offset + piece.count]
            offset += piece.count
            if req.done:
                continue
            if rows.shape[1] != req.result.shape[1]:
                self.fail(req, HostUnavailable("the model changed while the request waited; retry it"))
                continue
            over = [(int(i), n) for i, n in zip(piece.indices, counts, strict=True) if n > limit]
            if over and not req.truncate:
                self.fail(req, too_long(*min(over), limit))
                continue
            req.used_tokens += sum(min(n, limit) for n in counts)
            req.result[piece.indices] = rows
            req.remaining -= 1
            if req.remaining == 0:
                w.requests_served += 1
                self.finish(req)

    def batch_lost(self, w: WorkerHandle, pieces: list[Piece]) -> None:
        """The worker running ``pieces`` is gone: aborted by the watchdog (they timed out) or crashed."""
        if w.aborted:
            for piece in pieces:
                self.fail(piece.request, RequestTimeout("the request's deadline passed"))
        else:
            crashed = WorkerCrashed(
                f"the request crashed a worker {self.cfg.crash_retries + 1} times; it was not retried again", pid=w.pid
            )
            self.batch_failed(pieces, crashed, crashed=True)
        if not self.pool.stopping:
            self.dispatch()

    def batch_failed(self, pieces: list[Piece], error: ShmModelError, *, crashed: bool) -> None:
        """Retry each piece of a failed batch alone (after a crash up to SHM_MODEL_CRASH_RETRIES
        times); a piece that fails alone beyond that fails its request."""
        retry: list[Piece] = []
        for piece in pieces:
            if piece.request.done:
                continue
            piece.failures += 1
            isolated = piece.solo or len(pieces) == 1
            if (crashed and piece.failures > self.cfg.crash_retries) or (not crashed and isolated):
                self.fail(piece.request, error)
            else:
                piece.solo = True
                retry.append(piece)
        self.scheduler.push([p for p in retry if not p.request.done], front=True)
