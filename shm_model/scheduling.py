"""Who is served next: the host's queue of request pieces, in priority classes with fair shares.

Pure: no I/O, no event loop; the clock is passed in, so the rules run in unit tests with a
fake clock. The supervisor owns one ``Scheduler`` and asks it for a batch whenever a worker
is free.

* A request is cut into **pieces** (``split``) that each fit one batch: at most
  ``max_texts`` texts, ``max_tokens`` padded tokens (texts x the longest, estimated) and
  ``max_bytes``. Its texts are taken longest first, so that a batch pads little.
* Every request has a **priority class**. ``interactive`` (a chat query) goes before
  ``bulk`` (an ingestion), but bulk is never starved: classes share the workers' time by
  weight (start-time fair queueing over padded tokens, ``bulk_share`` of it for bulk when
  both are backlogged), and a class that was idle gets no credit for its idle time.
* Within a class, **clients** (peer processes) take turns: each batch starts with the client
  after the one that started the previous batch, so that no client monopolises a class.
* A **bulk batch is cut to a time budget** (``bulk_batch_seconds``), learned from measured
  seconds per padded token at each thread count, so that an interactive request waits at
  most about one bulk batch.
* While other requests wait, an **interactive batch is cut to a time budget** too
  (``query_batch_seconds``; at least one text). On a large model a batch of many queries runs
  for seconds, and the queries that arrive meanwhile wait for all of it; short batches served
  in turn keep every query's wait about the same. A request alone in its class is never cut
  by time.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shm_model.protocol import PRIORITIES

#: Smoothing of the learned seconds per padded token.
RATE_SMOOTHING = 0.3
#: Padded tokens of a bulk batch before any batch time was measured.
FIRST_BULK_TOKENS = 256
#: Queue waits remembered per class for the status percentiles.
WAITS_KEPT = 1024


def estimate_tokens(text: str, max_seq_length: int) -> int:
    """Cheap upper-leaning token estimate (about 3 UTF-8 bytes a token), capped by truncation."""
    return min(max_seq_length, 2 + len(text.encode("utf-8", "surrogatepass")) // 3)


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """The one rule for what fits in a batch sent to a worker."""

    max_texts: int
    max_tokens: int  # padded: texts x the longest text's estimated tokens
    max_bytes: int

    def room(self, count: int, longest: int, nbytes: int, token_budget: int | None = None) -> tuple[int, int, int]:
        """(texts, padded tokens, bytes) still free in a batch of ``count`` texts."""
        tokens = self.max_tokens if token_budget is None else min(self.max_tokens, token_budget)
        return self.max_texts - count, tokens - count * longest, self.max_bytes - nbytes


@dataclass(eq=False)
class Request:
    """An admitted encode request: its texts, where its vectors go and how it is answered."""

    id: Any
    conn: Any
    texts: list[str]
    prompt: str | None
    priority: str
    client: int  # the peer process; clients of a class take turns
    timeout: float
    arrived: float
    deadline: float
    result: np.ndarray
    order: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # text indices, longest first
    tokens: list[int] = field(default_factory=list)  # estimated tokens, in ``order``
    sizes: list[int] = field(default_factory=list)  # UTF-8 bytes, in ``order``
    remaining: int = 0  # pieces not yet delivered
    truncate: bool = True  # False: an input over the model's length fails the request
    used_tokens: int = 0  # tokens the model read, summed as pieces are delivered
    model: str = ""  # the served model that encodes it ("" for a host's only model)
    done: bool = False
    dispatched: bool = False
    timer: Any = None

    def prepare(self, max_seq_length: int) -> None:
        estimates = [estimate_tokens(t, max_seq_length) for t in self.texts]
        self.order = np.argsort(-np.asarray(estimates, dtype=np.int64), kind="stable")
        self.tokens = [estimates[i] for i in self.order]
        self.sizes = [len(self.texts[i].encode("utf-8")) for i in self.order]


def same_encoding(a: Request, b: Request) -> bool:
    """Whether two requests may share a batch: one model, one prompt."""
    return a.model == b.model and a.prompt == b.prompt


@dataclass(eq=False)
class Piece:
    """Texts ``order[start:stop]`` of a request, sent together in one batch."""

    request: Request
    start: int
    stop: int
    failures: int = 0
    solo: bool = False  # retried alone after its batch failed

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def longest(self) -> int:
        return self.request.tokens[self.start]  # texts are in order, longest first

    @property
    def nbytes(self) -> int:
        return sum(self.request.sizes[self.start : self.stop])

    @property
    def texts(self) -> list[str]:
        texts = self.request.texts
        return [texts[i] for i in self.request.order[self.start : self.stop]]

    @property
    def indices(self) -> np.ndarray:
        return self.request.order[self.start : self.stop]

    def cut(self, count: int) -> Piece:
        """Keep the first ``count`` texts here; return the rest as a new piece of the same request."""
        rest = Piece(self.request, self.start + count, self.stop, self.failures, self.solo)
        self.stop = self.start + count
        self.request.remaining += 1
        return rest


def split(request: Request, limits: BatchLimits) -> list[Piece]:
    """Cut a prepared request into pieces that each fit a batch on their own."""
    pieces: list[Piece] = []
    start = 0
    nbytes = 0
    for i in range(len(request.texts)):
        count = i - start + 1
        size = request.sizes[i]
        if count > 1 and (
            count > limits.max_texts
            or count * request.tokens[start] > limits.max_tokens
            or nbytes + size > limits.max_bytes
        ):
            pieces.append(Piece(request, start, i))
            start, nbytes = i, 0
        nbytes += size
    pieces.append(Piece(request, start, len(request.texts)))
    request.remaining = len(pieces)
    return pieces


#: Seconds after batches last overlapped during which each batch gets only its fair share of cores.
OVERLAP_WINDOW = 2.0


def even_share(waiting_texts: int, ways: int) -> int | None:
    """Texts one batch may take when ``ways`` batches share the waiting work (None: no cap).

    Without it, under load from many clients a worker that frees up takes the one request that
    just arrived while the others wait behind one large batch on another worker; its client is
    answered quickly, sends again, and is served again alone: a few clients get a batch to
    themselves and the rest wait for the large batch every time (at 16 closed-loop clients on
    the bundled model, half the requests at 25 ms and half at 250 ms). An even share keeps the
    batches of side-by-side workers the same size, so every request waits about as long, for
    the same throughput. When no more texts wait than there are ways, a batch takes them all:
    at low load, leaving one behind would only make the next batch smaller.
    """
    if ways <= 1 or waiting_texts <= ways:
        return None
    return -(-waiting_texts // ways)


def share_cores(free: int, idle_workers: int, waiting_pieces: int) -> int:
    """Intra-op threads for the next batch, from the cores that no busy worker holds.

    A lone batch gets them all; when more pieces wait than this batch may take and other
    workers are idle, the free cores are shared out so that those workers get some too.
    """
    if free < 1:
        return 0
    ways = min(idle_workers, free) if waiting_pieces > 1 else 1
    return max(1, free // max(1, ways))


class CoreShare:
    """How many intra-op threads each batch gets, never more than the cores no busy batch holds.

    While the host is quiet a lone batch gets every free core (a single query runs on all of
    them). Once interactive batches overlap (one starts while another runs, or one has to wait
    for cores that a lone batch took) the host is busy, and until ``window`` seconds after the
    last overlap every batch gets its fair share, cores // workers, so that requests arriving
    one after another run side by side instead of queueing for cores.

    When the dispatcher keeps a worker free for queries (a large model, or queries lately:
    ``Dispatcher._bulk_alone``), bulk batches run one at a time on every free core (``bulk``):
    a batch on all cores ends sooner than two side by side on one core each, so an
    interactive request waits less for a core. Otherwise bulk batches share the cores like
    any others, which keeps more of their throughput.
    """

    def __init__(self, cores: int, workers: int, *, window: float = OVERLAP_WINDOW) -> None:
        self.cores = cores
        self.fair = max(1, cores // max(1, workers))
        self.window = window
        self.busy_until = float("-inf")
        #: Cores other processes keep busy (``host.cpuload``): a batch is given no more threads
        #: than the cores left, but always one, as a thread of its own waits for no other.
        self.outside = 0

    def _room(self, threads: int, held: int) -> int:
        return min(threads, max(1, self.cores - held - self.outside)) if threads > 0 else threads

    def threads(self, now: float, held: int, busy_workers: int, idle_workers: int, waiting_pieces: int) -> int:
        """Threads for the next interactive batch (0: wait for a core).

        ``held`` is the threads of busy batches, ``busy_workers`` the interactive ones among them.
        """
        free = self.cores - held
        if busy_workers:  # interactive batches overlap; cores held by bulk work do not count
            self.busy_until = now + self.window
        threads = share_cores(free, idle_workers, waiting_pieces)
        return self._room(min(threads, self.fair) if now < self.busy_until else threads, held)

    def bulk(self, held: int, bulk_running: bool) -> int:
        """Threads for the next bulk batch: every free core, and none while another bulk batch runs."""
        return 0 if bulk_running else self._room(max(0, self.cores - held), held)

    def last(self, now: float, held: int) -> int:
        """Threads for a batch after which nothing waits: every free core while the host is quiet."""
        free = max(1, self.cores - held)
        return self._room(min(free, self.fair) if now < self.busy_until else free, held)


class _ClassQueue:
    """One priority class: a queue of pieces per client, served in turn."""

    def __init__(self) -> None:
        self.clients: collections.OrderedDict[int, collections.deque[Piece]] = collections.OrderedDict()
        self.texts = 0
        self.pieces = 0
        self.queued: collections.Counter[Request] = collections.Counter()  # pieces waiting, by request

    def __bool__(self) -> bool:
        return self.pieces > 0

    def add(self, piece: Piece, *, front: bool) -> None:
        queue = self.clients.setdefault(piece.request.client, collections.deque())
        if front:
            queue.appendleft(piece)
        else:
            queue.append(piece)
        self.texts += piece.count
        self.pieces += 1
        self.queued[piece.request] += 1

    def pop(self, client: int) -> Piece:
        queue = self.clients[client]
        piece = queue.popleft()
        self.texts -= piece.count
        self.pieces -= 1
        self.queued[piece.request] -= 1
        if self.queued[piece.request] <= 0:
            del self.queued[piece.request]
        if not queue:
            del self.clients[client]
        return piece

    def remove(self, request: Request) -> None:
        queue = self.clients.get(request.client)
        if not queue:
            return
        kept = collections.deque(p for p in queue if p.request is not request)
        for piece in queue:
            if piece.request is request:
                self.texts -= piece.count
                self.pieces -= 1
        self.queued.pop(request, None)
        if kept:
            self.clients[request.client] = kept
        else:
            del self.clients[request.client]

    def take(self, client: int, count: int) -> Piece:
        """Take the first ``count`` texts of a client's head piece (the whole piece, or a cut)."""
        head = self.clients[client][0]
        if count >= head.count:
            return self.pop(client)
        self.clients[client][0] = head.cut(count)
        self.texts -= count
        return head

    def requests(self) -> int:
        return len(self.queued)


@dataclass
class ClassStats:
    """What a class has been through, for ``status`` and metrics."""

    waits: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=WAITS_KEPT))
    batch_seconds: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=WAITS_KEPT))
    requests: int = 0
    batches: int = 0
    texts: int = 0
    tokens: int = 0


class Scheduler:
    """The queue's one owner: admits pieces, and hands out batches by priority and turn."""

    def __init__(
        self,
        limits: BatchLimits,
        *,
        bulk_share: float = 0.2,
        bulk_batch_seconds: float = 0.25,
        query_batch_seconds: float | None = None,
        on_expired: Callable[[Request], None] | None = None,
    ) -> None:
        if not 0.0 < bulk_share < 1.0:
            raise ValueError(f"bulk_share must be between 0 and 1, got {bulk_share}; this is a bug")
        self.limits = limits
        self.weights = {"interactive": 1.0 - bulk_share, "bulk": bulk_share}
        self.bulk_batch_seconds = bulk_batch_seconds
        self.query_batch_seconds = query_batch_seconds
        self.on_expired = on_expired
        self.queues = {p: _ClassQueue() for p in PRIORITIES}
        self.vtime = dict.fromkeys(PRIORITIES, 0.0)  # each class's next start tag
        self.vstart = dict.fromkeys(PRIORITIES, 0.0)  # the start tag of each class's last batch
        self.stats = {p: ClassStats() for p in PRIORITIES}
        self.rates: dict[int, float] = {}  # seconds per padded token, by intra-op threads

    # --- admission ---------------------------------------------------------------------

    def push(self, pieces: list[Piece], *, front: bool = False) -> None:
        """Queue pieces (a new request's, or failed ones to retry first)."""
        for piece in reversed(pieces) if front else pieces:
            queue = self.queues[piece.request.priority]
            if not queue:
                self._wake(piece.request.priority)
            queue.add(piece, front=front)

    def _wake(self, priority: str) -> None:
        """A class that was idle starts at the current virtual time (the start tag of the batch
        the other class has in service): no credit for idling, and no charge for that batch,
        which was counted when it was taken."""
        others = [self.vstart[p] for p in PRIORITIES if p != priority and self.queues[p]]
        if others:
            self.vtime[priority] = max(self.vtime[priority], min(others))

    def drop(self, request: Request) -> None:
        """Forget the queued pieces of a request that is done (answered, failed or abandoned)."""
        self.queues[request.priority].remove(request)

    # --- state ---------------------------------------------------------------------------

    def pending(self, priority: str | None = None) -> bool:
        if priority is not None:
            return bool(self.queues[priority])
        return any(self.queues.values())

    def bulk_text_over_budget(self, seconds: float | None = None) -> bool:
        """Whether the next bulk text alone takes longer than ``seconds`` (default: what a bulk
        batch may take) at one thread."""
        queue = self.queues["bulk"]
        budget = self.token_budget("bulk", 1, seconds)
        if not queue or budget is None:
            return False
        head = next(iter(queue.clients.values()))[0]
        return head.longest > budget

    def next_priority(self) -> str | None:
        """The class the next batch will come from (None when nothing waits)."""
        active = [p for p in PRIORITIES if self.queues[p]]
        return min(active, key=lambda p: (self.vtime[p], PRIORITIES.index(p))) if active else None

    def queued_pieces(self) -> int:
        return sum(q.pieces for q in self.queues.values())

    def depth(self) -> dict[str, dict[str, int]]:
        return {p: {"requests": q.requests(), "pieces": q.pieces, "texts": q.texts} for p, q in self.queues.items()}

    def pieces(self) -> Iterator[Piece]:
        for queue in self.queues.values():
            for client_queue in queue.clients.values():
                yield from client_queue

    # --- batches ---------------------------------------------------------------------------

    def observe(self, threads: int, padded_tokens: int, seconds: float, priority: str | None = None) -> None:
        """Learn how long a batch of this many padded tokens takes at this thread count."""
        if priority is not None:
            self.stats[priority].batch_seconds.append(seconds)
        if padded_tokens <= 0 or seconds <= 0:
            return
        rate = seconds / padded_tokens
        old = self.rates.get(threads)
        self.rates[threads] = rate if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * rate

    def token_budget(self, priority: str, threads: int, seconds: float | None = None) -> int | None:
        """Padded tokens a batch of this class may hold in ``seconds`` (bulk: by default its
        time budget; interactive: no cap unless ``seconds`` is given)."""
        if priority != "bulk" and seconds is None:
            return None
        rate = self.rates.get(threads)
        if rate is None:
            if not self.rates:
                return FIRST_BULK_TOKENS if priority == "bulk" else None  # a small batch teaches the rate
            nearest = min(self.rates, key=lambda t: abs(t - threads))
            rate = self.rates[nearest] * nearest / threads  # assume linear scaling until measured
        return max(1, int((self.bulk_batch_seconds if seconds is None else seconds) / rate))

    def _budget(self, priority: str, queue: _ClassQueue, threads: int) -> int | None:
        """Padded tokens the next batch of a class may hold (None: only the limits). An
        interactive batch is cut to ``query_batch_seconds`` only when other requests wait: the
        pieces of one large request alone go in full batches."""
        if priority == "bulk":
            return self.token_budget(priority, threads)
        if self.query_batch_seconds is None or len(queue.queued) <= 1:
            return None
        return self.token_budget(priority, threads, self.query_batch_seconds)

    def take(self, now: float, threads: int = 1, ways: int = 1) -> list[Piece]:
        """The next batch: pieces of one class, one model and one prompt, within the limits.

        ``ways`` is how many batches serve the interactive work side by side (the dispatcher's
        ``_ways``: those running, this one, and the idle workers the free cores allow): an
        interactive batch then takes at most an even share of the waiting texts (``even_share``).
        """
        while True:
            priority = self.next_priority()
            if priority is None:
                return []
            queue = self.queues[priority]
            share = even_share(queue.texts, ways) if priority == "interactive" else None
            batch = self._fill(queue, now, self._budget(priority, queue, threads), share)
            if batch:
                break
        cost = sum(p.count for p in batch) * max(p.longest for p in batch)
        self.vstart[priority] = self.vtime[priority]
        self.vtime[priority] += cost / self.weights[priority]
        stats = self.stats[priority]
        stats.batches += 1
        stats.texts += sum(p.count for p in batch)
        stats.tokens += cost
        for piece in batch:
            request = piece.request
            if not request.dispatched:
                request.dispatched = True
                stats.requests += 1
                stats.waits.append(now - request.arrived)
        return batch

    def _fill(self, queue: _ClassQueue, now: float, budget: int | None, share: int | None = None) -> list[Piece]:
        """Fill a batch from one class, clients in turn; the client that starts it goes to the back."""
        max_tokens = self.limits.max_tokens if budget is None else min(self.limits.max_tokens, budget)
        max_texts = self.limits.max_texts if share is None else min(self.limits.max_texts, share)
        batch: list[Piece] = []
        count = longest = nbytes = 0
        full = False
        for client in list(queue.clients):
            while not full and client in queue.clients:
                head = queue.clients[client][0]
                request = head.request
                if request.done:
                    queue.pop(client)
                    continue
                if request.deadline <= now:
                    queue.remove(request)
                    if self.on_expired is not None:
                        self.on_expired(request)
                    continue
                if batch and (head.solo or batch[0].solo or not same_encoding(request, batch[0].request)):
                    break
                new_longest = max(longest, head.longest)
                fit = min(head.count, max_texts - count, max_tokens // new_longest - count)
                fit = _within_bytes(head, fit, self.limits.max_bytes - nbytes)
                if fit <= 0:
                    if batch:
                        break
                    fit = 1  # a batch holds at least one text
                if head.solo:
                    fit = head.count  # a piece retried alone is never cut again
                taken = queue.take(client, fit)
                batch.append(taken)
                count += taken.count
                longest = new_longest
                nbytes += taken.nbytes
                full = taken.solo or fit < head.count or count >= max_texts
            if full:
                break
        if batch and batch[0].request.client in queue.clients:
            queue.clients.move_to_end(batch[0].request.client)
        return batch


def _within_bytes(piece: Piece, count: int, room: int) -> int:
    """How many of the piece's first ``count`` texts fit in ``room`` bytes."""
    sizes = piece.request.sizes
    used = 0
    for k in range(max(0, count)):
        used += sizes[piece.start + k]
        if used > room:
            return k
    return max(0, count)
