"""The scheduler's rules, in process with a fake clock: what goes in a batch, who goes next."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from shm_model.scheduling import (
    FIRST_BULK_TOKENS,
    BatchLimits,
    CoreShare,
    Piece,
    Request,
    Scheduler,
    even_share,
    share_cores,
    split,
)

LIMITS = BatchLimits(max_texts=32, max_tokens=4096, max_bytes=1 << 20)


def request(
    texts: list[str],
    *,
    priority: str = "interactive",
    client: int = 1,
    prompt: str | None = None,
    arrived: float = 0.0,
    timeout: float = 1e9,
) -> Request:
    req = Request(
        id=0,
        conn=None,
        texts=texts,
        prompt=prompt,
        priority=priority,
        client=client,
        timeout=timeout,
        arrived=arrived,
        deadline=arrived + timeout,
        result=np.zeros((len(texts), 1), dtype=np.float32),
    )
    req.prepare(128)
    return req


def submit(s: Scheduler, req: Request) -> list[Piece]:
    pieces = split(req, s.limits)
    s.push(pieces)
    return pieces


def padded(batch: list[Piece]) -> int:
    return sum(p.count for p in batch) * max(p.longest for p in batch)


def test_split_respects_every_limit_and_covers_each_text_once() -> None:
    texts = [("가" * (i % 50)) + str(i) for i in range(300)]
    req = request(texts)
    pieces = split(req, BatchLimits(max_texts=16, max_tokens=600, max_bytes=900))
    covered = np.concatenate([p.indices for p in pieces])
    assert sorted(covered.tolist()) == list(range(300))
    assert req.remaining == len(pieces)
    for p in pieces:
        assert p.count <= 16
        assert p.count == 1 or p.count * p.longest <= 600
        assert p.count == 1 or p.nbytes <= 900
        assert p.longest == max(req.tokens[p.start : p.stop])  # longest first


def test_padded_token_cap_bounds_every_batch() -> None:
    s = Scheduler(BatchLimits(max_texts=32, max_tokens=200, max_bytes=1 << 20))
    for client in range(5):
        submit(s, request(["x" * 150] * 3, client=client))  # 52 tokens each: 3 fit in 200
    while s.pending():
        batch = s.take(0.0)
        assert padded(batch) <= 200 or sum(p.count for p in batch) == 1


def test_interactive_goes_before_bulk_that_was_queued_first() -> None:
    s = Scheduler(LIMITS)
    submit(s, request(["bulk text"] * 200, priority="bulk", client=1))
    submit(s, request(["query"], priority="interactive", client=2))
    assert s.take(0.0)[0].request.priority == "interactive"


def test_batches_never_mix_prompts_or_models_and_retried_pieces_go_alone() -> None:
    s = Scheduler(LIMITS)
    submit(s, request(["a", "b"], prompt="query: ", client=1))
    submit(s, request(["c"], prompt="passage: ", client=2))
    submit(s, request(["d"], prompt="query: ", client=3))
    prompts = []
    while s.pending():
        batch = s.take(0.0)
        assert len({p.request.prompt for p in batch}) == 1
        prompts.append(batch[0].request.prompt)
    assert sorted(prompts) == ["passage: ", "query: "]
    for model, client in (("a", 4), ("b", 5), ("a", 6)):
        req = request([f"m{client}"], client=client)
        req.model = model
        submit(s, req)
    assert sorted([p.request.model for p in s.take(0.0)] for _ in range(2)) == [["a", "a"], ["b"]]
    retry = split(request(["e", "f"]), LIMITS)[0]
    retry.solo = True
    submit(s, request(["g"]))
    s.push([retry], front=True)
    assert s.take(0.0) == [retry]
    assert [p.texts for p in s.take(0.0)] == [["g"]]


def test_expired_requests_are_handed_back_not_batched() -> None:
    expired: list[Request] = []
    s = Scheduler(LIMITS, on_expired=expired.append)
    late = request(["late"], timeout=1.0)
    submit(s, late)
    submit(s, request(["fresh"], arrived=1.5))
    batch = s.take(2.0)
    assert [p.texts for p in batch] == [["fresh"]]
    assert expired == [late]


def test_a_dropped_request_leaves_the_queue_and_its_counts() -> None:
    s = Scheduler(LIMITS)
    gone = request(["x"] * 100, priority="bulk")
    submit(s, gone)
    submit(s, request(["y"] * 3, priority="bulk", client=2))
    s.drop(gone)
    assert s.depth()["bulk"] == {"requests": 1, "pieces": 1, "texts": 3}
    assert [p.request.client for p in s.take(0.0)] == [2]
    assert not s.pending()


def test_bulk_batches_are_cut_to_the_time_budget_learned_from_batch_times() -> None:
    s = Scheduler(LIMITS, bulk_batch_seconds=0.1)
    submit(s, request(["가나다라마바사" * 10] * 500, priority="bulk"))  # 72 tokens each
    first = s.take(0.0)
    assert padded(first) <= FIRST_BULK_TOKENS
    s.observe(1, 1000, 0.5)  # 0.5 ms a padded token at one thread
    batch = s.take(0.0, threads=1)
    assert padded(batch) <= 200 and sum(p.count for p in batch) == 200 // 72
    s.observe(2, 1000, 0.25)  # twice as fast at two threads: twice the texts
    assert sum(p.count for p in s.take(0.0, threads=2)) == 400 // 72
    # interactive batches are not cut to the bulk budget
    submit(s, request(["가나다라마바사" * 10] * 20))
    assert sum(p.count for p in s.take(0.0, threads=1)) == 20


def test_clients_of_a_class_take_turns() -> None:
    s = Scheduler(LIMITS, bulk_batch_seconds=0.1)
    s.observe(1, 1000, 1.0)  # 100 padded tokens a bulk batch
    submit(s, request(["a" * 60] * 300, priority="bulk", client=1))  # client 1 queued first, and more
    submit(s, request(["b" * 60] * 100, priority="bulk", client=2))
    served: collections.Counter[int] = collections.Counter()
    for _ in range(40):
        for piece in s.take(0.0):
            served[piece.request.client] += piece.count
    assert served[1] == served[2] > 0


def simulate(s: Scheduler, seconds_per_token: float, workers: int, until: float, arrivals: list[Request]) -> dict:
    """Run workers against the scheduler with a fake clock; return texts served per (class, client)."""
    clock = 0.0
    free_at = [0.0] * workers
    pending = sorted(arrivals, key=lambda r: r.arrived)
    served: collections.Counter[tuple[str, int]] = collections.Counter()
    waits: dict[str, list[float]] = collections.defaultdict(list)
    finished: dict[int, float] = {}
    while clock < until:
        while pending and pending[0].arrived <= clock:
            submit(s, pending.pop(0))
        w = min(range(workers), key=lambda i: free_at[i])
        clock = max(clock, free_at[w])
        while pending and pending[0].arrived <= clock:
            submit(s, pending.pop(0))
        batch = s.take(clock)
        if not batch:
            clock = pending[0].arrived if pending else until
            continue
        seconds = padded(batch) * seconds_per_token
        s.observe(1, padded(batch), seconds)
        free_at[w] = clock + seconds
        for piece in batch:
            served[(piece.request.priority, piece.request.client)] += piece.count
            piece.request.remaining -= 1
            if piece.request.remaining == 0:
                finished[id(piece.request)] = free_at[w]
                waits[piece.request.priority].append(free_at[w] - piece.request.arrived)
    return {"served": served, "latency": waits}


def test_backlogged_classes_share_by_weight_and_nobody_starves() -> None:
    s = Scheduler(LIMITS, bulk_share=0.2, bulk_batch_seconds=0.05)
    text = "문장 " * 20  # 48 tokens
    arrivals = [request([text] * 2000, priority="bulk", client=c) for c in (1, 2)]
    arrivals += [request([text] * 2000, priority="interactive", client=c) for c in (3, 4)]
    result = simulate(s, 1e-4, workers=2, until=4.0, arrivals=arrivals)  # all of it would take 19 s
    served = result["served"]
    bulk = served[("bulk", 1)] + served[("bulk", 2)]
    interactive = served[("interactive", 3)] + served[("interactive", 4)]
    assert bulk / (bulk + interactive) == pytest.approx(0.2, abs=0.05)
    assert served[("bulk", 1)] == pytest.approx(served[("bulk", 2)], rel=0.1)
    assert served[("interactive", 3)] == pytest.approx(served[("interactive", 4)], rel=0.1)


def test_a_query_waits_at_most_about_one_bulk_batch() -> None:
    s = Scheduler(LIMITS, bulk_batch_seconds=0.2)
    text = "문장 " * 20
    arrivals = [request([text] * 5000, priority="bulk", client=1)]
    arrivals += [request(["질문"], priority="interactive", client=2, arrived=1.0 + 0.37 * i) for i in range(40)]
    result = simulate(s, 1e-3, workers=2, until=20.0, arrivals=arrivals)
    latencies = result["latency"]["interactive"]
    assert len(latencies) == 40
    assert max(latencies) <= 0.2 * 1.5 + 0.01  # one bulk batch (learned within its smoothing), then its own
    alone = 19.0 * 2 / (arrivals[0].tokens[0] * 1e-3)  # texts two workers encode in 19 s of bulk alone
    assert result["served"][("bulk", 1)] >= 0.85 * alone  # bulk keeps its throughput


def test_an_idle_class_gets_no_credit_for_its_idle_time() -> None:
    s = Scheduler(LIMITS, bulk_share=0.2)
    for i in range(50):  # interactive alone for a while: its virtual time grows
        submit(s, request(["q" * 30], client=i))
        s.take(0.0)
    submit(s, request(["b" * 30] * 64, priority="bulk", client=99))
    submit(s, request(["q" * 30] * 64, client=100))
    first = [s.take(0.0)[0].request.priority for _ in range(4)]
    assert first.count("interactive") >= 2  # bulk did not bank the time it was not there


def test_queries_arriving_during_a_bulk_batch_go_first_one_after_another() -> None:
    """A class that wakes starts at the virtual time of the batch being served, not after it:
    a query is not charged for the bulk batch that was already running when it arrived."""
    s = Scheduler(LIMITS, bulk_share=0.2)
    submit(s, request(["b" * 200] * 64, priority="bulk", client=1))
    assert s.take(0.0)[0].request.priority == "bulk"  # in service
    for i in range(5):  # queries one after another while that batch runs
        submit(s, request(["q" * 10], client=2 + i))
        assert s.next_priority() == "interactive", i
        assert s.take(0.0)[0].request.priority == "interactive"


@pytest.mark.parametrize(
    ("free", "idle", "waiting", "threads"),
    [
        (2, 2, 1, 2),  # a lone request gets every core
        (2, 2, 5, 1),  # more work than one batch and another idle worker: share the cores
        (1, 1, 5, 1),  # the other worker holds a core
        (0, 1, 5, 0),  # every core held: wait, never oversubscribe
        (8, 2, 9, 4),
        (8, 3, 2, 2),
    ],
)
def test_cores_are_shared_out_never_oversubscribed(free: int, idle: int, waiting: int, threads: int) -> None:
    assert share_cores(free, idle, waiting) == threads


def test_a_quiet_host_gives_a_lone_batch_every_core_a_busy_one_a_fair_share() -> None:
    share = CoreShare(cores=2, workers=2, window=2.0)
    assert share.threads(0.0, held=0, busy_workers=0, idle_workers=2, waiting_pieces=1) == 2
    # a request arrives while that batch holds both cores: it waits, and the host counts as busy
    assert share.threads(0.1, held=2, busy_workers=1, idle_workers=1, waiting_pieces=1) == 0
    assert share.threads(0.3, held=0, busy_workers=0, idle_workers=2, waiting_pieces=1) == 1
    assert share.last(0.3, held=0) == 1
    # batches side by side keep the host busy; a quiet spell gives lone batches every core again
    assert share.threads(1.0, held=1, busy_workers=1, idle_workers=1, waiting_pieces=1) == 1
    assert share.threads(2.9, held=0, busy_workers=0, idle_workers=2, waiting_pieces=1) == 1
    assert share.threads(3.1, held=0, busy_workers=0, idle_workers=2, waiting_pieces=1) == 2
    assert share.last(3.1, held=0) == 2


def test_bulk_texts_over_the_budget_are_told_apart() -> None:
    s = Scheduler(LIMITS, bulk_batch_seconds=0.1)
    submit(s, request(["가" * 300] * 4, priority="bulk"))  # 128 tokens each (the cap)
    assert not s.bulk_text_over_budget()  # nothing measured yet
    s.observe(1, 1000, 0.5)  # 200 tokens fit the budget: one text does
    assert not s.bulk_text_over_budget()
    s.observe(1, 100, 0.5)  # now a text takes longer than a batch may
    assert s.bulk_text_over_budget()
    # A batch's budget once per layer (24 layers): the batch may hold the text, but the text
    # still takes longer than a query should wait, which the dispatcher asks with ``seconds``.
    s.bulk_batch_seconds = 0.1 * 24
    assert not s.bulk_text_over_budget()
    assert s.bulk_text_over_budget(0.1)
    rate = s.rates[1]
    assert s.token_budget("bulk", 1) == int(2.4 / rate) and s.token_budget("bulk", 1, 0.1) == int(0.1 / rate)
    assert s.token_budget("interactive", 1) is None and s.token_budget("interactive", 1, 0.1) == int(0.1 / rate)
    share = CoreShare(cores=2, workers=2)
    assert share.bulk(held=0, bulk_running=False) == 2
    assert share.bulk(held=1, bulk_running=False) == 1
    assert share.bulk(held=2, bulk_running=True) == 0


def test_interactive_batches_are_cut_to_their_time_budget_only_while_others_wait() -> None:
    s = Scheduler(LIMITS, query_batch_seconds=0.1)
    for _ in range(8):
        submit(s, request(["a" * 90]))  # 32 tokens each
    assert len(s.take(0.0)) == 8  # nothing measured yet: not cut
    s.observe(1, 100, 0.1)  # 1 ms a padded token: 100 tokens in the budget
    for _ in range(8):
        submit(s, request(["a" * 90]))
    assert [len(s.take(0.0)) for _ in range(3)] == [3, 3, 2]  # 3 x 32 tokens fit the 100
    lone = submit(s, request(["a" * 90] * 8))
    assert len(lone) == 1 and sum(p.count for p in s.take(0.0)) == 8  # a lone request: no cut by time
    assert len(submit(s, request(["a" * 90] * 64))) == 2  # one request in two pieces: full batches
    assert [sum(p.count for p in s.take(0.0)) for _ in range(2)] == [32, 32]
    submit(s, request(["a" * 300] * 2))  # 102 tokens a text: over the budget alone
    submit(s, request(["a" * 90]))
    assert [sum(p.count for p in s.take(0.0)) for _ in range(3)] == [1, 1, 1]  # at least one text a batch
    s.observe(2, 100, 0.05)  # twice as fast at two threads: twice the tokens
    for _ in range(8):
        submit(s, request(["a" * 90]))
    assert len(s.take(0.0, threads=2)) == 6
    off = Scheduler(LIMITS)  # no budget: only the limits cut an interactive batch
    off.observe(1, 100, 0.1)
    for _ in range(8):
        submit(off, request(["a" * 90]))
    assert len(off.take(0.0)) == 8
    bulk = Scheduler(LIMITS, bulk_batch_seconds=10.0, query_batch_seconds=0.1)  # bulk keeps its own budget
    bulk.observe(1, 100, 0.1)
    for _ in range(8):
        submit(bulk, request(["a" * 90], priority="bulk"))
    assert len(bulk.take(0.0)) == 8


def test_even_share_splits_the_waiting_texts_between_the_batches_that_serve_them() -> None:
    assert even_share(16, 1) is None  # one way: no cap
    assert even_share(2, 2) is None  # no more than one text a way: all of them
    assert even_share(3, 2) == 2
    assert even_share(16, 2) == 8
    assert even_share(15, 2) == 8
    s = Scheduler(LIMITS)
    for client in range(16):
        submit(s, request(["x"], client=client))
    assert sum(p.count for p in s.take(0.0, ways=2)) == 8
    assert sum(p.count for p in s.take(0.0, ways=1)) == 8  # the rest: nothing else waits
    for _ in range(6):
        submit(s, request(["x"] * 4, priority="bulk"))
    assert sum(p.count for p in s.take(0.0, ways=2)) == 24  # bulk batches are cut by time, not shared


def closed_loop(clients: int, *, ways_aware: bool, seconds: float = 30.0) -> tuple[float, np.ndarray]:
    """Two one-thread workers serve ``clients`` that each send one text, wait for the answer and
    send again (a virtual clock; a batch of n texts takes 4 + 18.5 n ms, the bundled model on one
    core; answers reach the clients 0.15 ms apart, each sends again 0.3 ms after its answer),
    scheduled as the dispatcher does. Returns the requests per second and their latencies (ms)."""
    import heapq

    s = Scheduler(LIMITS)
    events: list[tuple[float, int, str, object]] = []
    order = iter(range(10**9))
    idle = [0, 1]
    running: dict[int, list[Piece]] = {}
    latencies: list[float] = []

    def send(at: float, client: int) -> None:
        heapq.heappush(events, (at, next(order), "send", client))

    def dispatch(now: float) -> None:
        while s.pending() and idle:
            ways = len(idle) + len(running) if ways_aware else 1
            batch = s.take(now, 1, ways=ways)
            worker = idle.pop(0)
            running[worker] = batch
            texts = sum(p.count for p in batch)
            heapq.heappush(events, (now + (4 + 18.5 * texts) / 1e3, next(order), "done", worker))

    for client in range(clients):
        send(client * 1e-4, client)
    while events:
        now, _, kind, what = heapq.heappop(events)
        if now > seconds:
            break
        if kind == "send":
            submit(s, request(["x"], client=1, arrived=now))  # one process: one client for turns
            s.queues["interactive"].clients[1][-1].request.id = what  # who to answer
        else:
            batch = running.pop(what)  # type: ignore[arg-type]
            idle.append(what)  # type: ignore[arg-type]
            for k, piece in enumerate(batch):
                answered = now + 0.00015 * (k + 1)
                latencies.append((answered - piece.request.arrived) * 1e3)
                send(answered + 0.0003, piece.request.id)
        dispatch(now)
    kept = np.array(latencies[len(latencies) // 10 :])
    return len(latencies) / seconds, kept


@pytest.mark.parametrize("clients", [4, 8, 16, 32])
def test_closed_loop_clients_wait_about_as_long_as_each_other(clients: int) -> None:
    """Many clients of one process on two workers: without even shares one worker serves a few
    clients again and again while the rest wait behind one large batch (half the requests at
    ~25 ms, half at ~250 ms at 16 clients); with them every request waits about the mean."""
    rps, latencies = closed_loop(clients, ways_aware=True)
    old_rps, old = closed_loop(clients, ways_aware=False)
    if clients >= 8:  # the model shows the problem
        assert np.percentile(old, 99) > 1.4 * np.percentile(old, 50) or np.percentile(old, 50) > 1.4 * old.mean()
    else:  # few clients: nothing to even out, the same batches as before
        assert rps == pytest.approx(old_rps, rel=0.01)
        return
    mean = latencies.mean()
    assert np.percentile(latencies, 50) <= 1.1 * mean
    assert np.percentile(latencies, 99) <= 1.25 * mean
    assert rps >= 0.97 * old_rps  # the same throughput


def test_a_bulk_batch_gets_no_core_while_every_core_is_held() -> None:
    share = CoreShare(cores=2, workers=2)
    assert share.bulk(held=2, bulk_running=False) == 0
    assert share.bulk(held=3, bulk_running=False) == 0
    assert share.bulk(held=1, bulk_running=False) == 1


def test_the_rest_of_a_cut_piece_keeps_its_failures_and_its_solo_retry() -> None:
    req = request(["dddd", "ccc", "bb", "a"])
    (piece,) = split(req, LIMITS)
    piece.failures, piece.solo = 2, True
    rest = piece.cut(1)
    assert (rest.request, rest.start, rest.stop, rest.failures, rest.solo) == (req, 1, 4, 2, True)
    assert (piece.start, piece.stop, req.remaining) == (0, 1, 2)


def test_the_bulk_budget_is_judged_at_one_thread_and_a_text_of_exactly_the_budget_fits() -> None:
    s = Scheduler(LIMITS, bulk_batch_seconds=1.0)
    assert not s.bulk_text_over_budget()  # no bulk text waits
    s.observe(1, 100, 1.0)  # 0.01 s a padded token at one thread: 100 tokens a batch
    assert (s.token_budget("bulk", 1), s.token_budget("bulk", 2)) == (100, 200)
    submit(s, request(["x" * 294], priority="bulk"))  # 2 + 294 // 3 = 100 tokens
    assert not s.bulk_text_over_budget()
    s.take(0.0)
    submit(s, request(["x" * 297], priority="bulk"))  # 101 tokens
    assert s.bulk_text_over_budget()
