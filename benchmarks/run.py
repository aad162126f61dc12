"""All benchmarks in one run, as ratios measured side by side on the same machine.

    python -m benchmarks.run --quick        # a few minutes: the bundled model
    python -m benchmarks.run --full         # the bundled and the KURE-shaped model, more load
    python -m benchmarks.run --tiny         # minutes: every section once, for the slow tests
    python -m benchmarks.run --quick --runs 3   # the concurrency section 3 times, medians

Sections: memory (RSS/PSS/USS sums, naive vs host), start-up (process start to first
vector; the host's cold start by phase), overhead (in-process encode vs the host at
batch sizes 1-128), concurrency (1..32 clients sending batch-1 requests: the host with
dynamic batching vs one model per process vs sentence-transformers' multi-process pool
vs infinity-emb) and transport (round trip through the host with a model-free backend).
The machine is noisy, so full mode runs the concurrency section three times, each run every
system in turn, and reports each figure's median and each ratio's median over the ratios
measured within a run, with their range. At each level where both run, the host and one model
per process take turns in blocks (``PAIRED_BLOCKS``), as the client and /v1/embeddings do, so
that the machine's drift during a level falls on both alike.
Results go to benchmarks/results/<mode>.json, .md and .png. Every process started is
ended when the run ends, Ctrl-C included. The load generator shares the machine's cores
with what it measures, the same for every system.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks import common, memory
from benchmarks.common import ROOT, SENTENCES, bench_env, end, host, model_location, percentile, progress, spawn
from shm_model.client import HostClient

INFINITY_VENV = os.path.join(ROOT, "benchmarks", ".venv-infinity")


@dataclass
class Plan:
    mode: str
    models: list[str]
    consumers: list[int]
    placements: list[str]
    copied: bool
    startup_runs: int
    batch_sizes: list[int]
    overhead_seconds: float
    levels: list[int]
    naive_levels: list[int]  # measured in turns with the host, so each one is also in levels
    level_seconds: float
    pool_sentences: int
    transport_calls: int
    infinity: bool
    runs: int = 1  # the concurrency section's repetitions; figures and ratios are their medians
    notes: list[str] = field(default_factory=list)


PLANS = {
    "tiny": Plan("tiny", ["bundled"], [1], ["auto"], False, 1, [1, 8], 0.3, [1, 2], [1], 0.5, 64, 100, False),
    "quick": Plan(
        "quick",
        ["bundled"],
        [2],
        ["auto", "shm"],
        True,
        3,
        [1, 8, 32, 128],
        2.0,
        [1, 4, 16, 32],
        [1, 4],
        4.0,
        2048,
        2000,
        True,
    ),
    "full": Plan(
        "full",
        ["bundled", "kure"],
        [2, 4, 8],
        ["auto", "shm"],
        True,
        5,
        [1, 8, 32, 128],
        5.0,
        [1, 2, 4, 8, 16, 32],
        [1, 2, 4, 8],
        10.0,
        2048,
        5000,
        True,
        runs=3,
    ),
}
#: The KURE-shaped model encodes about ten times slower: its one-large-input runs are smaller.
BULK_DIVISOR = {"kure": 8}


def _cores() -> int:
    return os.cpu_count() or 1


def _texts(n: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} ({i})" for i in range(n)]


# --- start-up -----------------------------------------------------------------------------


def _time_process(code: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = spawn([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=600)
    end(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"start-up probe failed: {err[-500:]}")
    return time.perf_counter() - started


def bench_startup(plan: Plan, model: str) -> dict[str, Any]:
    naive_code = (
        "import torch\nfrom sentence_transformers import SentenceTransformer\n"
        "from benchmarks.common import model_location\n"
        f"m = SentenceTransformer(model_location({model!r}), device='cpu')\n"
        "m.encode(['첫 번째 문장'])\n"
    )
    client_code = "from shm_model import HostClient\nHostClient().encode(['첫 번째 문장'])\n"
    naive = [_time_process(naive_code, bench_env()) for _ in range(plan.startup_runs)]
    progress(f"start-up: naive first vector {statistics.median(naive):.2f}s")
    started = time.perf_counter()
    with host(model) as sock:
        cold = time.perf_counter() - started
        with HostClient(sock) as client:
            boot = client.status()["boot_seconds"]
        client_runs = [_time_process(client_code, bench_env(SHM_MODEL_SOCKET=sock)) for _ in range(plan.startup_runs)]
    progress(f"start-up: client first vector {statistics.median(client_runs):.3f}s, host cold start {cold:.2f}s")
    return {
        "naive_first_vector_s": statistics.median(naive),
        "client_first_vector_s": statistics.median(client_runs),
        "ratio_client_vs_naive": statistics.median(client_runs) / statistics.median(naive),
        "host_cold_start_s": cold,
        "host_boot_s": boot,
        "runs": {"naive": naive, "client": client_runs},
    }


# --- overhead: in-process vs host at fixed batch sizes ----------------------------------


#: In-process and host calls take turns in this many rounds at each batch size, so that the
#: machine's drift falls on both alike; the ratio is the median of the rounds' ratios.
OVERHEAD_ROUNDS = 3


def _calls(fn: Any, seconds: float) -> list[float]:
    """Seconds of each call of ``fn`` for about ``seconds``, at least one call."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while not times or time.perf_counter() < deadline:
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def alternate(local: Any, hosted: Any, seconds: float, rounds: int = OVERHEAD_ROUNDS) -> dict[str, Any]:
    """``local`` and ``hosted`` in turns, ``seconds`` each in all: medians of their calls, host /
    in-process in each round, and the median of those."""
    local()  # warm up
    hosted()
    local_times: list[float] = []
    host_times: list[float] = []
    ratios: list[float] = []
    for _ in range(rounds):
        a = _calls(local, seconds / rounds)
        b = _calls(hosted, seconds / rounds)
        local_times += a
        host_times += b
        ratios.append(statistics.median(b) / statistics.median(a))
    return {
        "in_process_ms": statistics.median(local_times) * 1e3,
        "host_ms": statistics.median(host_times) * 1e3,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }


def bench_overhead(plan: Plan, model: str) -> list[dict[str, Any]]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(_cores())
    st = SentenceTransformer(model_location(model), device="cpu")
    rows = []
    # One worker with every core: the same compute as in-process, so the ratio is the host's cost.
    with host(
        model,
        SHM_MODEL_WORKERS="1",
        SHM_MODEL_THREADS_PER_WORKER=str(_cores()),
        SHM_MODEL_MAX_BATCH_SIZE="128",
        SHM_MODEL_MAX_BATCH_TOKENS="65536",
    ) as sock:
        with HostClient(sock, timeout=600) as client:
            for size in plan.batch_sizes:
                texts = _texts(size)
                row = alternate(
                    lambda t=texts, b=size: st.encode(t, batch_size=b),
                    # interactive: the host's cost, not the bulk class's shorter batches (> 16 texts)
                    lambda t=texts, b=size: client.encode(t, batch_size=b, priority="interactive"),
                    plan.overhead_seconds,
                )
                rows.append({"batch_size": size} | row)
                progress(
                    f"overhead: batch {size}: in-process {row['in_process_ms']:.1f} ms, "
                    f"host {row['host_ms']:.1f} ms, host / in-process {row['ratio']:.2f}"
                )
    return rows


# --- concurrency --------------------------------------------------------------------------


@dataclass
class Tally:
    """Latencies, errors and elapsed time of one system at one level, over one or more blocks."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def add(self, other: Tally) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        self.elapsed += other.elapsed

    def row(self, clients: int) -> dict[str, Any]:
        return {
            "clients": clients,
            "requests": len(self.latencies),
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
            "throughput_rps": len(self.latencies) / self.elapsed,
            "p50_ms": percentile(self.latencies, 50) * 1e3,
            "p99_ms": percentile(self.latencies, 99) * 1e3,
        }


def _drive_tally(n: int, seconds: float, call: Any) -> Tally:
    """n threads call ``call(thread, i)`` for ``seconds``; their latencies and errors."""
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors: list[str] = []
    start = threading.Barrier(n + 1)
    stop_at = [0.0]

    def run(k: int) -> None:
        start.wait()
        i = 0
        while time.perf_counter() < stop_at[0]:
            began = time.perf_counter()
            try:
                call(k, i)
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                latencies[k].append(time.perf_counter() - began)
            i += 1

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for t in threads:
        t.join(seconds + 120)
    return Tally([x for per in latencies for x in per], errors, time.perf_counter() - began)


def _drive(n: int, seconds: float, call: Any) -> dict[str, Any]:
    """n threads call ``call(thread, i)`` for ``seconds``; count successes and latencies."""
    return _drive_tally(n, seconds, call).row(n)


#: At each level both run, the host and one model per process take turns in this many blocks,
#: so that the machine's drift during a level falls on both alike.
PAIRED_BLOCKS = 4


def _host_levels(plan: Plan, model: str, dtype: str = "float32", *, paired: bool = False) -> dict[str, Any]:
    """The host at each of ``plan.levels``; with ``paired``, also one model per process at each
    of ``plan.naive_levels``, taking turns with the host in blocks."""
    rows, naive_rows = [], []
    with host(model, SHM_MODEL_DTYPE=dtype) as sock:
        client = HostClient(sock, timeout=120, pool_size=max(plan.levels))
        client.encode(_texts(8))

        def call(k: int, i: int) -> None:
            client.encode([SENTENCES[(k + i) % 6]])

        for n in plan.levels:
            if not (paired and n in plan.naive_levels):
                rows.append(_drive(n, plan.level_seconds, call))
            else:
                seconds = plan.level_seconds / PAIRED_BLOCKS
                threads = max(1, _cores() // n)
                hosted, naive = Tally(), Tally()
                with _consumers(model, n, threads, seconds) as procs:
                    for _ in range(PAIRED_BLOCKS):
                        _wait_until_others_idle(client)
                        hosted.add(_drive_tally(n, seconds, call))
                        naive.add(_naive_block(procs))
                rows.append(hosted.row(n))
                naive_rows.append(naive.row(n) | {"threads_per_process": threads})
                progress(f"concurrency: naive, {n} processes: {naive_rows[-1]['throughput_rps']:.0f} req/s")
            progress(f"concurrency: host {dtype}, {n} clients: {rows[-1]['throughput_rps']:.0f} req/s")
        client.close()
    return {"host": rows, "naive": naive_rows}


def _wait_until_others_idle(client: HostClient, timeout: float = 10.0) -> None:
    """Until the host no longer counts the block of one model per process that just ended as
    outside load, which would give a lone batch fewer threads for a sampling interval or two."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = client.status().get("outside_busy_cores")
        if busy is None or busy < 0.5:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def _consumers(model: str, n: int, threads: int, seconds: float) -> Iterator[list[subprocess.Popen[str]]]:
    """n processes, each with its own model and ``threads`` torch threads, ready for blocks of
    ``seconds``."""
    procs = [
        spawn(
            [sys.executable, "-m", "benchmarks.consumer", "loop", model, str(threads), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=bench_env(),
        )
        for _ in range(n)
    ]
    try:
        memory._wait_ready(procs)
        yield procs
    finally:
        for proc in procs:
            end(proc)


def _naive_block(procs: list[subprocess.Popen[str]]) -> Tally:
    """One block of every consumer encoding one text at a time, started together."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = memory._wait_ready(procs, 60, "during a block")
    return Tally([x for r in results for x in r["latencies"]], [], max(r["elapsed"] for r in results))


def _tail(path: str, size: int = 64 * 1024) -> str:
    """The last ``size`` bytes of a log file (a server may have written a lot before failing)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode("utf-8", "replace")


def _wait_http(port: int, path: str, proc: subprocess.Popen[Any], timeout: float, log: str) -> str | None:
    """None once GET ``path`` answers 200, else why not (the process ended, or the time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return None
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            lines = _tail(log).strip().splitlines()
            return lines[-1] if lines else f"exit {proc.returncode}"
        time.sleep(0.2)


def _embeddings_caller(port: int, path: str, fields: dict[str, Any]) -> Any:
    """``call(client, i)`` for ``_drive``: one sentence to an OpenAI-style embeddings route, one
    keep-alive connection per client thread."""
    local = threading.local()

    def call(k: int, i: int) -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = json.dumps({**fields, "input": [SENTENCES[(k + i) % 6]]})
        local.conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = local.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")

    return call


def _http_levels(plan: Plan, model: str) -> dict[str, Any]:
    """``POST /v1/embeddings`` through the API server (uvicorn) on a host, and the same host
    through the client, at 1 and 16 clients: what the HTTP path adds."""
    levels = [n for n in (1, 16) if n <= max(plan.levels)]
    port = 17998
    with host(model) as sock, tempfile.TemporaryDirectory(prefix="shm-bench-api-") as tmp:
        log = os.path.join(tmp, "api.log")
        env = bench_env(
            SHM_MODEL_SOCKET=sock, SHM_MODEL_MODE="shared", API_PORT=str(port), RAG_DB=os.path.join(tmp, "rag.sqlite3")
        )
        with open(log, "w") as out:
            proc = spawn([sys.executable, "-m", "api_server"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            problem = _wait_http(port, "/health/ready", proc, 300, log)
            if problem:
                return {"error": f"the API server did not start: {problem}"}
            call = _embeddings_caller(port, "/v1/embeddings", {})
            client = HostClient(sock, timeout=120, pool_size=max(levels))
            encode = lambda k, i: client.encode([SENTENCES[(k + i) % 6]])  # noqa: E731
            http_rows, client_rows = [], []
            for n in levels:  # each level through the client, then through HTTP
                client_rows.append(_drive(n, plan.level_seconds, encode))
                http_rows.append(_drive(n, plan.level_seconds, call))
                progress(f"concurrency: /v1/embeddings, {n} clients: {http_rows[-1]['throughput_rps']:.0f} req/s")
            client.close()
        finally:
            end(proc)
    return {"http": http_rows, "client": client_rows}


def _st_pool(plan: Plan, model: str, count: int) -> dict[str, Any]:
    """sentence-transformers' multi-process pool, used as designed: one caller, one large input."""
    code = (
        "import json, sys, time\nfrom sentence_transformers import SentenceTransformer\n"
        "from benchmarks.common import model_location\n"
        f"m = SentenceTransformer(model_location({model!r}), device='cpu')\n"
        f"pool = m.start_multi_process_pool(['cpu'] * {_cores()})\n"
        f"texts = [f'문장 {{i}} ' * (1 + i % 4) for i in range({count})]\n"
        "m.encode(texts[:64], pool=pool)\n"
        "t = time.perf_counter(); v = m.encode(texts, pool=pool, batch_size=32); s = time.perf_counter() - t\n"
        "m.stop_multi_process_pool(pool)\n"
        "print(json.dumps({'sentences': len(texts), 'seconds': s}))\n"
    )
    proc = spawn(
        [sys.executable, "-c", code], env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate(timeout=1800)
    end(proc)
    if proc.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    result = json.loads(out.strip().splitlines()[-1])
    result["throughput_sentences_per_s"] = result["sentences"] / result["seconds"]
    progress(f"concurrency: sentence-transformers pool: {result['throughput_sentences_per_s']:.0f} sentences/s")
    return result


def _host_bulk(model: str, count: int) -> dict[str, Any]:
    """The host given the same one large input as the pool, for a like-for-like figure."""
    texts = [f"문장 {i} " * (1 + i % 4) for i in range(count)]
    with host(model) as sock, HostClient(sock, timeout=1800) as client:
        client.encode(texts[:64])
        started = time.perf_counter()
        client.encode(texts)
        seconds = time.perf_counter() - started
    return {"sentences": len(texts), "seconds": seconds, "throughput_sentences_per_s": len(texts) / seconds}


def install_infinity() -> str | None:
    """Install infinity-emb in its own venv (its [all] extra pulls a CUDA torch); None or why not."""
    python = os.path.join(INFINITY_VENV, "bin", "python")
    if os.path.exists(os.path.join(INFINITY_VENV, "bin", "infinity_emb")):
        return None
    progress(f"installing infinity-emb into {INFINITY_VENV} (about a minute)")
    steps = [
        [sys.executable, "-m", "venv", INFINITY_VENV],
        [python, "-m", "pip", "install", "-q", "torch==2.13.0", "infinity-emb[torch,server]"],
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip() and "Location" not in line]
            return f"did not install ({' '.join(step[-2:])}): {lines[-1] if lines else proc.returncode}"
    return None


def _infinity_levels(plan: Plan, model: str) -> dict[str, Any]:
    python = os.path.join(INFINITY_VENV, "bin", "python")
    binary = os.path.join(INFINITY_VENV, "bin", "infinity_emb")
    problem = install_infinity()
    if problem:
        return {"error": problem}
    location = model_location(model)
    port = 17997
    args = [binary, "v2", "--model-id", location, "--port", str(port), "--engine", "torch", "--device", "cpu"]
    args += ["--batch-size", "32"]
    log = tempfile.NamedTemporaryFile(prefix="shm-bench-infinity-", suffix=".log", delete=False)
    with log:
        proc = spawn(args, env=bench_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        problem = _wait_http(port, "/health", proc, 600, log.name)
        if problem:
            return {"error": f"infinity did not start: {problem}"}
        call = _embeddings_caller(port, "/embeddings", {"model": location})
        rows = []
        for n in plan.levels:
            rows.append(_drive(n, plan.level_seconds, call))
            progress(f"concurrency: infinity-emb, {n} clients: {rows[-1]['throughput_rps']:.0f} req/s")
        version = subprocess.run(
            [python, "-c", "import infinity_emb; print(infinity_emb.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.strip()
        return {"version": version, "levels": rows}
    finally:
        end(proc)
        os.unlink(log.name)


def _concurrency_once(plan: Plan, name: str, model: str) -> dict[str, Any]:
    paired = _host_levels(plan, model, paired=True)
    out: dict[str, Any] = {
        "host": paired["host"],
        "host_int8": _host_levels(plan, model, "int8")["host"],
        "naive": paired["naive"],
        "http": _http_levels(plan, model),
    }
    count = plan.pool_sentences // BULK_DIVISOR.get(name, 1)
    out["st_pool"] = _st_pool(plan, model, count)
    out["host_bulk"] = _host_bulk(model, count)
    out["infinity"] = _infinity_levels(plan, model) if plan.infinity else {"error": "skipped in this mode"}
    return out


def bench_concurrency(plan: Plan, name: str, model: str) -> dict[str, Any]:
    """The concurrency section ``plan.runs`` times in a row, each run every system in turn."""
    runs = []
    for k in range(plan.runs):
        if plan.runs > 1:
            progress(f"concurrency: run {k + 1} of {plan.runs}")
        runs.append(_concurrency_once(plan, name, model))
    return combine_runs(runs)


# --- several runs: medians of figures and of ratios -------------------------------------------

RATE_KEYS = ("throughput_rps", "p50_ms", "p99_ms")


def _median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One system's rows over several runs: at each level req/s, p50 and p99 are the medians
    over the runs; requests and errors are summed."""
    out = []
    for rows in zip(*runs, strict=True):
        if len({r["clients"] for r in rows}) != 1:
            raise ValueError(f"runs measured different levels: {[r['clients'] for r in rows]}")
        row = {**rows[0], **{k: statistics.median(r[k] for r in rows) for k in RATE_KEYS}}
        row["requests"] = sum(r["requests"] for r in rows)
        row["errors"] = sum(r["errors"] for r in rows)
        row["first_error"] = next((r["first_error"] for r in rows if r.get("first_error")), None)
        out.append(row)
    return out


def _median_bulk(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    return {
        "sentences": ok[0]["sentences"],
        "seconds": statistics.median(r["seconds"] for r in ok),
        "throughput_sentences_per_s": statistics.median(r["throughput_sentences_per_s"] for r in ok),
        "failed_runs": len(runs) - len(ok),
    }


def _by_clients(rows: list[dict[str, Any]] | None) -> dict[int, dict[str, Any]]:
    return {r["clients"]: r for r in rows or []}


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "throughput_rps") -> float | None:
    return a[key] / b[key] if a and b and b.get(key) else None


def run_ratios(c: dict[str, Any]) -> dict[str, Any]:
    """The ratios of one run (None where a system did not run): req/s against one model per
    process and infinity-emb, p50 and p99 against infinity-emb's, int8 against float32, one
    large input against the pool, and /v1/embeddings against the client."""
    host_rows, int8 = _by_clients(c["host"]), _by_clients(c.get("host_int8"))
    naive, inf = _by_clients(c["naive"]), _by_clients(c["infinity"].get("levels"))
    pool, bulk = c["st_pool"], c["host_bulk"]
    http = c.get("http") or {}
    return {
        "levels": [
            {
                "clients": n,
                "host_vs_naive": _ratio(r, naive.get(n)),
                "host_vs_infinity": _ratio(r, inf.get(n)),
                "p50_vs_infinity": _ratio(r, inf.get(n), "p50_ms"),
                "p99_vs_infinity": _ratio(r, inf.get(n), "p99_ms"),
                "int8_vs_float32": _ratio(int8.get(n), r),
            }
            for n, r in host_rows.items()
        ],
        "bulk_vs_pool": None if "error" in pool else _ratio(bulk, pool, "throughput_sentences_per_s"),
        "http": [
            {"clients": cl["clients"], "http_vs_client": _ratio(h, cl)}
            for cl, h in zip(http.get("client", []), http.get("http", []), strict=True)
        ],
    }


def _spread(values: list[float | None]) -> dict[str, float] | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {"median": statistics.median(known), "min": min(known), "max": max(known), "runs": len(known)}


def combine_ratios(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run ratios into one: each ratio's median, min and max over the runs."""

    def rows(key: str) -> list[dict[str, Any]]:
        # By level: a run whose system failed (an /v1/embeddings server that did not start)
        # has no rows there, and the other runs' ratios stand.
        levels: dict[int, list[dict[str, Any]]] = {}
        for run in per_run:
            for row in run[key]:
                levels.setdefault(row["clients"], []).append(row)
        return [
            {"clients": n} | {k: _spread([x[k] for x in same]) for k in same[0] if k != "clients"}
            for n, same in levels.items()
        ]

    return {
        "levels": rows("levels"),
        "bulk_vs_pool": _spread([r["bulk_vs_pool"] for r in per_run]),
        "http": rows("http"),
    }


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of the concurrency section as one: each figure the median over the runs,
    each ratio the median of the ratios measured within each run (with their min and max),
    and every run kept as measured."""
    ratios = combine_ratios([run_ratios(r) for r in runs])
    if len(runs) == 1:
        return {**runs[0], "runs": 1, "ratios": ratios}
    infinity_ok = [r["infinity"] for r in runs if "levels" in r["infinity"]]
    infinity: dict[str, Any] = runs[0]["infinity"]
    if infinity_ok:
        infinity = {"version": infinity_ok[0]["version"], "levels": _median_rows([i["levels"] for i in infinity_ok])}
        if len(infinity_ok) < len(runs):
            failed = next(r["infinity"]["error"] for r in runs if "levels" not in r["infinity"])
            infinity["note"] = f"{len(runs) - len(infinity_ok)} of {len(runs)} runs failed: {failed}"
    http_ok = [r["http"] for r in runs if "error" not in r["http"]]
    http = (
        {"http": _median_rows([h["http"] for h in http_ok]), "client": _median_rows([h["client"] for h in http_ok])}
        if http_ok
        else runs[0]["http"]
    )
    return {
        "host": _median_rows([r["host"] for r in runs]),
        "host_int8": _median_rows([r["host_int8"] for r in runs]),
        "naive": _median_rows([r["naive"] for r in runs]),
        "http": http,
        "st_pool": _median_bulk([r["st_pool"] for r in runs]),
        "host_bulk": _median_bulk([r["host_bulk"] for r in runs]),
        "infinity": infinity,
        "runs": len(runs),
        "ratios": ratios,
        "each_run": runs,
    }


# --- transport --------------------------------------------------------------------------------


def bench_transport(plan: Plan) -> dict[str, Any]:
    """Round trips through the host with the model-free backend: the protocol's own cost."""
    with host("dummy", SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1") as sock, HostClient(sock) as client:
        out = {}
        for name, call in (("ping", client.ping), ("encode_1", lambda: client.encode(["한 문장"]))):
            call()
            times = []
            for _ in range(plan.transport_calls):
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
            out[name] = {"p50_us": percentile(times, 50) * 1e6, "p99_us": percentile(times, 99) * 1e6}
        progress(f"transport: ping p50 {out['ping']['p50_us']:.0f} us, encode p50 {out['encode_1']['p50_us']:.0f} us")
        return out


# --- report ---------------------------------------------------------------------------------


def _rate(value: float) -> str:
    """A rate with the digits that matter: 3.2 req/s on a large model, 1,234 on a small one."""
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _fmt(spread: dict[str, float] | None) -> str:
    """A ratio as ``median``, or ``median (min-max)`` where the runs differed."""
    if spread is None:
        return "-"
    low, high = f"{spread['min']:.2f}", f"{spread['max']:.2f}"
    return f"{spread['median']:.2f}" if low == high else f"{spread['median']:.2f} ({low}-{high})"


def _md_concurrency(c: dict[str, Any]) -> str:
    systems = [("host (dynamic batching)", c["host"])]
    if "host_int8" in c:
        systems.append(("host, SHM_MODEL_DTYPE=int8", c["host_int8"]))
    systems.append(("one model per process", c["naive"]))
    if "levels" in c["infinity"]:
        systems.append((f"infinity-emb {c['infinity'].get('version', '')}", c["infinity"]["levels"]))
    runs = c.get("runs", 1)
    lines = []
    if runs > 1:
        lines += [
            f"Median of {runs} runs, each run every system in turn. A ratio is the median of the ratios "
            "measured within each run, with their range.",
            "",
        ]
    lines += ["| system | clients | req/s | p50 (ms) | p99 (ms) | errors |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in systems:
        for r in rows:
            lines.append(
                f"| {name} | {r['clients']} | {_rate(r['throughput_rps'])} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['errors']} |"
            )
    if "error" in c["infinity"]:
        lines.append(f"\ninfinity-emb: {c['infinity']['error']}")
    if "note" in c["infinity"]:
        lines.append(f"\ninfinity-emb: {c['infinity']['note']}")
    pool, bulk = c["st_pool"], c["host_bulk"]
    if "error" in pool:
        lines.append(f"\nsentence-transformers pool: {pool['error']}")
    else:
        lines.append(
            f"\nOne input of {pool['sentences']} sentences: sentence-transformers' multi-process pool "
            f"{_rate(pool['throughput_sentences_per_s'])} sentences/s, the host "
            f"{_rate(bulk['throughput_sentences_per_s'])} sentences/s "
            f"(host / pool {_fmt(c['ratios']['bulk_vs_pool'])})."
        )
    lines += ["", _md_ratios(c["ratios"]), "", _md_http(c.get("http"), c["ratios"]["http"])]
    return "\n".join(lines)


def _md_ratios(ratios: dict[str, Any]) -> str:
    """Ratios at each level: req/s, and p50/p99 against infinity-emb's."""
    lines = [
        "| clients | host / one model per process (req/s) | host / infinity-emb (req/s) | "
        "host / infinity-emb (p50) | host / infinity-emb (p99) | int8 / float32 (req/s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ratios["levels"]:
        keys = ("host_vs_naive", "host_vs_infinity", "p50_vs_infinity", "p99_vs_infinity", "int8_vs_float32")
        lines.append(f"| {r['clients']} | " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def _md_http(h: dict[str, Any] | None, ratios: list[dict[str, Any]]) -> str:
    if not h:
        return ""
    if "error" in h:
        return f"/v1/embeddings: {h['error']}"
    lines = [
        "| clients | client req/s | /v1/embeddings req/s | HTTP / client | client p50 (ms) | /v1/embeddings p50 (ms) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c, r, q in zip(h["client"], h["http"], ratios, strict=True):
        lines.append(
            f"| {c['clients']} | {_rate(c['throughput_rps'])} | {_rate(r['throughput_rps'])} | "
            f"{_fmt(q['http_vs_client'])} | {c['p50_ms']:.1f} | {r['p50_ms']:.1f} |"
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    parts = [f"# Benchmarks ({results['mode']} mode, {results['machine']})", ""]
    for model, r in results["models"].items():
        s = r["startup"]
        parts += [
            f"## {model}",
            "",
            "### Memory",
            "",
            memory.table(r["memory"]),
            "",
            "### Start-up (process start to first vector)",
            "",
            f"- one model per process: {s['naive_first_vector_s']:.2f} s; torch-free client with a warm host: "
            f"{s['client_first_vector_s']:.3f} s (ratio {s['ratio_client_vs_naive']:.3f})",
            f"- host cold start to first answer: {s['host_cold_start_s']:.2f} s "
            f"(import {s['host_boot_s']['import']} s, load {s['host_boot_s']['load']} s, "
            f"place weights {s['host_boot_s']['place']} s, fork until workers ready "
            f"{s['host_boot_s']['fork_until_ready']} s)",
            "",
            "### Overhead of the host (one worker with every core vs in-process)",
            "",
            f"In-process and host calls in {OVERHEAD_ROUNDS} alternating rounds: median times, and the median "
            "of the rounds' ratios with their range.",
            "",
            "| batch size | in-process (ms) | host (ms) | host / in-process |",
            "|---:|---:|---:|---:|",
        ]
        parts += [
            f"| {o['batch_size']} | {o['in_process_ms']:.1f} | {o['host_ms']:.1f} | {_fmt(_spread(o['ratios']))} |"
            for o in r["overhead"]
        ]
        parts += ["", "### Concurrent clients, batch-1 requests", "", _md_concurrency(r["concurrency"]), ""]
    t = results["transport"]
    parts += [
        "## Transport (model-free backend)",
        "",
        f"- ping round trip: p50 {t['ping']['p50_us']:.0f} us, p99 {t['ping']['p99_us']:.0f} us",
        f"- encode of one text: p50 {t['encode_1']['p50_us']:.0f} us, p99 {t['encode_1']['p99_us']:.0f} us",
        "",
        f"Reproduce: `{results['command']}`",
    ]
    return "\n".join(parts) + "\n"


def plot(results: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    models = list(results["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        c = results["models"][model]["concurrency"]
        series = [("host", c["host"])]
        if "host_int8" in c:
            series.append(("host, int8", c["host_int8"]))
        series.append(("one model per process", c["naive"]))
        if "levels" in c["infinity"]:
            series.append(("infinity-emb", c["infinity"]["levels"]))
        for name, rows in series:
            xs = [r["clients"] for r in rows]
            axes[row][0].plot(xs, [r["throughput_rps"] for r in rows], marker="o", label=name)
            axes[row][1].plot(xs, [r["p99_ms"] for r in rows], marker="o", label=name)
        axes[row][0].set(
            title=f"{model}: throughput, batch-1 requests",
            xlabel="concurrent clients",
            ylabel="requests/s",
            xscale="log",
        )
        axes[row][1].set(
            title=f"{model}: p99 latency", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log"
        )
        axes[row][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def run(plan: Plan, out_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {
        **common.results_header("benchmarks.run", plan.mode),
        "runs": plan.runs,
        "models": {},
    }
    if plan.runs != PLANS[plan.mode].runs:
        results["command"] += f" --runs {plan.runs}"
    for name in plan.models:
        model = memory.model_name(name)
        progress(f"model {name}: {model}")
        per: dict[str, Any] = {}
        per["memory"] = [r.__dict__ for r in memory.run_all(model, plan.consumers, plan.placements, 2, plan.copied)]
        per["startup"] = bench_startup(plan, model)
        per["overhead"] = bench_overhead(plan, model)
        per["concurrency"] = bench_concurrency(plan, name, model)
        results["models"][name] = per
    results["transport"] = bench_transport(plan)
    common.write_results(os.path.join(out_dir, plan.mode), results, markdown, plot)
    return results


def main(argv: list[str] | None = None) -> int:
    return common.main(__doc__, PLANS, run, argv)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
