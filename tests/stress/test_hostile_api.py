"""Hostile requests to the API server: each one ends within 10 s with a 4xx, the server's memory
stays within 512 MB of where it was, and /health/live answers in < 100 ms while it runs.

Transport attacks (lying or huge bodies, slow headers, Host, concurrency) go to a real
``shm-model api`` subprocess on the dummy backend; the rest use FastAPI's TestClient. ``-s``
prints each attack's figures."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import api_server
from benchmarks.common import percentile
from shm_model.manager import ModelManager
from tablerag import answers
from tablerag.jobs import MAX_NAME_BYTES, Jobs, short_name
from tests.conftest import ROOT, ApiUrl, Host, base_env, launch, poll
from tests.conftest import api_server as run_api_server

pytestmark = pytest.mark.serial  # bounds on seconds and on /health latency

MB = 1 << 20
HEALTH_BOUND = 0.1
RSS_BOUND = 512 * MB
ATTACK_BOUND = 10.0
FIGURES: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def dummy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    host = launch(tmp_path_factory.mktemp("dummy"), SHM_MODEL_BACKEND="dummy")
    try:
        host.wait_ready()
        yield host
    finally:
        host.terminate()


@pytest.fixture(scope="module")
def server(dummy: Host, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiUrl]:
    """The API server with its default limits, but a 3 s body timeout."""
    folder = tmp_path_factory.mktemp("api")
    env = base_env(
        SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=dummy.socket, RAG_DB=str(folder / "rag.db"),
        API_UPLOAD_DIR=str(folder / "uploads"), API_BODY_TIMEOUT="3",
    )  # fmt: skip
    for name in ("API_MAX_BODY_BYTES", "API_MAX_JSON_BYTES", "API_KEY", "API_ALLOWED_HOSTS"):
        env.pop(name, None)
    with run_api_server(env, folder / "api.log") as url:
        yield url
    print(f"\nhostile API figures: {json.dumps(FIGURES, indent=1)}")


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


class Liveness:
    """GET /health/live from a second thread, in a loop, until stopped; keeps the worst latency."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.count = url, 0.0, 0
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(self.url + "/health/live").status_code == 200
                except httpx.HTTPError as exc:
                    ok = False
                    self.failures.append(repr(exc))
                elapsed = time.perf_counter() - started
                self.worst, self.count = max(self.worst, elapsed), self.count + 1
                self.latencies.append(elapsed)
                if not ok:
                    self.failures.append(f"not 200 after {elapsed:.3f}s")
                self._stop.wait(0.02)

    def __enter__(self) -> Liveness:
        self._thread.start()
        poll(lambda: self.count > 0, 10, what="a first /health/live")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@contextmanager
def attack(server: ApiUrl, name: str) -> Iterator[dict[str, float]]:
    """Times the block; asserts /health/live stayed fast and the server's peak RSS stayed bounded."""
    rss_before = status_kb(server.pid, "VmRSS")
    figures: dict[str, float] = {}
    with Liveness(server) as live:
        started = time.monotonic()
        yield figures
        figures["seconds"] = round(time.monotonic() - started, 2)
    figures["peak_rss_growth_mb"] = round((status_kb(server.pid, "VmHWM") - rss_before) / MB, 1)
    figures["health_worst_ms"] = round(live.worst * 1000, 1)
    figures["health_p99_ms"] = round(percentile(live.latencies, 99) * 1000, 1)
    figures["health_requests"] = live.count
    FIGURES[name] = figures
    assert not live.failures, (name, live.failures[:3])
    # Liveness stays fast throughout: 99% of the probes under the bound, and a short attack (a
    # few probes, where p99 is the slowest) may have one over it, which the 2-core machine's
    # scheduler delayed; none as slow as a blocked event loop (seconds).
    slow = sum(t >= HEALTH_BOUND for t in live.latencies)
    figures["health_over_bound"] = slow
    assert slow <= max(1, len(live.latencies) // 100), (name, figures)
    assert live.worst < 10 * HEALTH_BOUND, (name, figures)
    assert figures["peak_rss_growth_mb"] * MB < RSS_BOUND, (name, figures)


def raw_request(port: int, head: bytes, body: Iterator[bytes] | None = None, timeout: float = ATTACK_BOUND) -> bytes:
    """Send ``head`` then ``body`` chunks, stopping as soon as the server answers or closes;
    returns the start of its response (b"" if it closed without one)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in body or ():
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            assert time.monotonic() < deadline, "still sending at the deadline"
        answer = b""
        try:
            while time.monotonic() < deadline:
                head, _, body = answer.partition(b"\r\n\r\n")
                length = next((int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                               if k.lower() == b"content-length"), 0)  # fmt: skip
                if _ and len(body) >= length:
                    break
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
        return answer


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def post_head(path: str, port: int, **headers: str) -> bytes:
    kind = "multipart/form-data; boundary=b0undary" if path == "/documents" else "application/json"
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {kind}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def pieces(data: bytes, size: int = 64 << 10) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def chunked(data: bytes, size: int = 64 << 10) -> Iterator[bytes]:
    for piece in pieces(data, size):
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


# --- bodies ---------------------------------------------------------------------------------------


def test_huge_and_lying_bodies_are_refused_as_they_arrive(server: ApiUrl) -> None:
    port = server.port
    integers = b'{"input": [' + b"1, " * 3_000_000 + b"1]}"  # 9 MB, 3 M integers
    text = b'{"input": "' + b"a" * (10 * MB) + b'"}'
    with attack(server, "9 MB integer array, Content-Length") as figures:
        answer = raw_request(
            port, post_head("/v1/embeddings", port, Content_Length=str(len(integers))), pieces(integers)
        )
        assert status_of(answer) == 413, answer[:300]
    assert figures["seconds"] < ATTACK_BOUND
    with attack(server, "9 MB integer array, chunked") as figures:
        head = post_head("/v1/embeddings", port, Transfer_Encoding="chunked")
        answer = raw_request(port, head, chunked(integers))
        assert status_of(answer) == 413, answer[:300]
    with attack(server, "60 MB chunked body behind Content-Length: 10") as figures:
        head = post_head("/v1/embeddings", port, Content_Length="10", Transfer_Encoding="chunked")
        answer = raw_request(port, head, chunked(b"x" * (60 * MB), 1 * MB))
        assert status_of(answer) in (400, 413), answer[:300]
    with attack(server, "60 MB chunked upload behind Content-Length: 10") as figures:
        head = post_head("/documents", port, Content_Length="10", Transfer_Encoding="chunked")
        part = b'--b0undary\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\n'
        answer = raw_request(port, head, chunked(part + b"x" * (60 * MB), 1 * MB))
        assert status_of(answer) in (400, 413), answer[:300]
    with attack(server, "10 MB string") as figures:
        answer = raw_request(port, post_head("/v1/embeddings", port, Content_Length=str(len(text))), pieces(text))
        assert status_of(answer) == 413, answer[:300]
    within = b'{"input": [' + b"1," * 900_000 + b"1]}"  # 1.8 MB: under the JSON limit
    with attack(server, "1.8 MB integer array (under the body limit)") as figures:
        response = httpx.post(
            server + "/v1/embeddings", content=within, headers={"content-type": "application/json"}, timeout=10
        )
        assert response.status_code == 422 and len(response.content) < 1000, response.content[:300]
        assert "900001 token ids; at most 8192" in response.json()["error"]["message"]
    mixed = b'{"input": [[1, 2], ' + b'"a", ' * 500 + b'"a"]}'
    response = httpx.post(server + "/v1/embeddings", content=mixed, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "input[1] is a str" in response.json()["error"]["message"]
    assert len(response.content) < 1000


def test_a_body_sent_too_slowly_is_408(server: ApiUrl) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(post_head("/v1/embeddings", server.port, Content_Length="1000") + b'{"input": "')
        answer = sock.recv(65536)
        assert status_of(answer) == 408, answer
        assert 2.5 < time.monotonic() - started < 8  # API_BODY_TIMEOUT=3


def test_default_body_limits(server: ApiUrl) -> None:
    """The defaults, pinned from both sides: a declared length just over each limit is refused
    before anything is sent, and real bodies well over 50 KiB get through."""
    port = server.port
    for path, limit in (("/documents", 50 * MB), ("/v1/embeddings", 2 * MB)):
        answer = raw_request(port, post_head(path, port, Content_Length=str(limit + 1)))
        assert status_of(answer) == 413 and f"over {limit} bytes".encode() in answer, answer
    upload = httpx.post(
        server + "/documents", files=[("files", ("big.txt", b"1 MB of text. " * (MB // 14), "text/plain"))], timeout=30
    )
    assert upload.status_code == 202, upload.text
    poll(lambda: httpx.get(server + upload.json()["status_url"]).json()["state"] == "done", 60, what="the job")
    text = "가나다라 " * 20_000  # 100,000 characters, 260 KB of JSON
    embedded = httpx.post(server + "/v1/embeddings", json={"input": text}, timeout=30)
    assert embedded.status_code == 200 and len(embedded.json()["data"]) == 1


# --- concurrency and slow clients ----------------------------------------------------------------


def test_concurrent_large_requests_are_refused_or_served_while_liveness_answers(server: ApiUrl) -> None:
    port = server.port
    oversized = json.dumps({"input": "a" * 600_000}).encode()  # 600 KB, over the characters cap
    allowed = json.dumps({"input": ["b" * 100_000]}).encode()

    def send(body: bytes) -> int:
        head = post_head("/v1/embeddings", port, Content_Length=str(len(body)))
        return status_of(raw_request(port, head, pieces(body)))

    with attack(server, "45 concurrent 600 KB inputs") as figures, ThreadPoolExecutor(45) as pool:
        statuses = list(pool.map(send, [oversized] * 45, timeout=ATTACK_BOUND))
    assert statuses == [422] * 45 and figures["seconds"] < ATTACK_BOUND
    with attack(server, "45 concurrent 100,000-character inputs") as figures, ThreadPoolExecutor(45) as pool:
        statuses = list(pool.map(send, [allowed] * 45, timeout=ATTACK_BOUND))
    assert set(statuses) <= {200, 429} and 200 in statuses, statuses
    figures["served"], figures["refused_429"] = statuses.count(200), statuses.count(429)


def test_slow_headers_are_closed_and_liveness_answers(server: ApiUrl) -> None:
    sockets: list[socket.socket] = []
    try:
        with attack(server, "1,000 connections holding partial headers") as figures:
            for _ in range(1000):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                sockets.append(sock)
            opened = time.monotonic()
            open_ = set(sockets)
            deadline = opened + 30
            while open_ and time.monotonic() < deadline:
                readable, _, _ = select.select(list(open_), [], [], 0.5)
                for sock in readable:
                    try:
                        data = sock.recv(1024)
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        open_.discard(sock)
            figures["closed_after_s"] = round(time.monotonic() - opened, 1)
        assert not open_, f"{len(open_)} slow connections still open after 30 s"
        assert figures["closed_after_s"] < 25, figures  # API_HEADER_TIMEOUT is 10 s
    finally:
        for sock in sockets:
            sock.close()


# --- hosts, origins, keys --------------------------------------------------------------------------


def test_other_hosts_and_cross_site_posts_are_refused(server: ApiUrl) -> None:
    port = server.port
    get = f"GET /health/live HTTP/1.1\r\nHost: attacker.example:{port}\r\n\r\n".encode()
    assert status_of(raw_request(port, get)) == 400
    search = json.dumps({"query": "x"}).encode()
    head = post_head("/search", port, Content_Length=str(len(search))).replace(b"127.0.0.1", b"attacker.example")
    assert status_of(raw_request(port, head, iter([search]))) == 400
    files = [("files", ("a.exe", b"MZ", "application/octet-stream"))]  # same-origin: 422, no job started
    for headers, status in [
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Referer": "http://evil.example/page"}, 403),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}, 422),
        ({"Origin": f"http://localhost:{port}"}, 422),
        ({}, 422),
    ]:
        response = httpx.post(server + "/documents", files=files, headers=headers, timeout=10)
        assert response.status_code == status, (headers, response.text)
        assert "access-control-allow-origin" not in response.headers
    preflight = httpx.options(
        server + "/documents", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


@pytest.fixture
def app_for(dummy: Host, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A TestClient on the dummy host with the given settings; closed afterwards."""
    clients: list[TestClient] = []
    monkeypatch.setenv("SHM_MODEL_MODE", "shared")
    monkeypatch.setenv("SHM_MODEL_SOCKET", dummy.socket)

    def make(**settings: Any) -> TestClient:
        settings.setdefault("db", str(tmp_path / "rag.db"))
        settings.setdefault("upload_dir", str(tmp_path / "uploads"))
        ModelManager.reset_instance()
        client = TestClient(api_server.create_app(api_server.Settings(**settings)), base_url="http://localhost")
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    ModelManager.reset_instance()


def test_an_api_key_guards_every_route_but_health_and_the_page(app_for: Any) -> None:
    api = app_for(api_key="s3cret")
    for method, path, body in [("POST", "/v1/embeddings", {"input": "x"}), ("GET", "/model/status", None)]:
        refused = api.request(method, path, json=body)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        wrong = api.request(method, path, json=body, headers={"Authorization": "Bearer s3creT"})
        assert wrong.status_code == 401
        ok = api.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
    assert api.get("/openapi.json").status_code == 401
    assert api.get("/health/live").status_code == 200 and api.get("/health/ready").status_code == 200
    assert api.get("/").status_code == 200 and 'id="apikey"' in api.get("/").text
    assert api.post("/", json={"inputs": "x"}).status_code == 401  # TEI's root route embeds: not the page
    refused = api.post("/embed", json={"inputs": "x"})
    assert refused.status_code == 401 and refused.json()["error_type"] == "Validation"
    assert api.get("/health").status_code == 200


def test_bad_settings_and_open_binds_exit_2_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in base_env().items() if k != "API_KEY"}
    cases = [
        ({}, ["--host", "0.0.0.0"], "API_HOST='0.0.0.0' is not a loopback address"),
        ({"API_JOB_TIMEOUT": "soon"}, [], "API_JOB_TIMEOUT='soon' is invalid; allowed values"),
        ({"API_KEEP_UPLOADS": "maybe"}, [], "API_KEEP_UPLOADS='maybe' is invalid; allowed values"),
    ]
    for extra, args, words in cases:
        done = subprocess.run(
            [sys.executable, "-m", "shm_model", "api", "--port", "1", *args],
            env={**env, **extra}, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, (extra, args, done.stderr)
        assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr


def test_every_api_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = subprocess.run(
        [sys.executable, "-m", "shm_model", "api", "--help"],
        env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    from config.settings import settings_of

    for setting in settings_of("api"):
        assert f"`{setting.env}`" in readme and setting.env in shown, setting.env


# --- responses ---------------------------------------------------------------------------------------


def test_search_and_chat_responses_are_bounded(server: ApiUrl, tmp_path: Path) -> None:
    rows = ["지역,연도,설명"] + [f"지역{i:04d},{2000 + i % 25},{'긴 설명 ' * 30}{i}" for i in range(3000)]
    csv = "\n".join(rows).encode()  # 1.5 MB: one table of 3,000 rows
    upload = httpx.post(
        server + "/documents", files=[("files", ("큰표.csv", csv, "text/csv"))],
        headers={"Origin": f"http://127.0.0.1:{server.port}"}, timeout=30,
    )  # fmt: skip
    assert upload.status_code == 202, upload.text
    job = poll(
        lambda: (j := httpx.get(server + upload.json()["status_url"]).json())["state"] in ("done", "failed") and j,
        90,
        what="the ingestion",
    )
    assert job["state"] == "done" and job["chunks"] >= 3000, job
    assert httpx.post(server + "/search", json={"query": "지역0042", "k": 100}).status_code == 422
    # The first search after an ingestion rebuilds the retriever's index (tablerag, GIL-bound): not measured.
    assert httpx.post(server + "/search", json={"query": "지역0001", "k": 1}, timeout=30).status_code == 200
    with attack(server, "/search k=50 on a 3,000-row table") as figures:
        found = httpx.post(server + "/search", json={"query": "지역0042 설명", "k": 50, "mode": "bm25"}, timeout=10)
    assert found.status_code == 200 and len(found.content) <= answers.MAX_RESPONSE_BYTES + 1000
    figures["response_bytes"] = len(found.content)
    results = found.json()["results"]
    assert results and all(len((r["table"] or "").encode()) <= answers.MAX_TABLE_BYTES for r in results)
    top = results[0]
    assert top["row"]["지역"] == "지역0042" and top["table_truncated"] and "| 지역0042 |" in top["table"]
    with attack(server, "/chat k=20 on a 3,000-row table") as figures:
        answer = httpx.post(server + "/chat", json={"question": "지역0042 설명", "k": 20, "mode": "bm25"}, timeout=10)
    assert answer.status_code == 200 and len(answer.content) <= answers.MAX_RESPONSE_BYTES + 10_000
    figures["response_bytes"] = len(answer.content)


def test_bounded_table_keeps_the_rows_around_the_hit() -> None:
    header = "| 키 | 값 |\n|---|---|\n"
    markdown = header + "\n".join(f"| k{i} | {'v' * 50} |" for i in range(1000))
    small = header + "| k1 | v |"
    assert answers.bounded_table(small, {"키": "k1"}) == (small, False)
    table, cut = answers.bounded_table(markdown, {"키": "k500", "값": "v" * 50}, limit=1000)
    assert cut and table is not None and len(table.encode()) <= 1000 and table.startswith(header)
    lines = table.split("\n")[2:]
    assert "| k500 |" in table and abs(len(lines) // 2 - next(i for i, x in enumerate(lines) if "k500 " in x)) <= 1
    assert answers.bounded_table(markdown, {"키": "missing"}, limit=1000) == (None, True)


def test_long_names_are_cut_by_bytes_on_a_character_boundary() -> None:
    name = "가" * 196 + ".xlsx"
    short = short_name(name)
    assert len(short.encode()) <= MAX_NAME_BYTES and short.endswith(".xlsx") and name.startswith(short[:-5])
    assert short_name("a.txt") == "a.txt"


# --- ingestion jobs -----------------------------------------------------------------------------------


def secrets_env(monkeypatch: pytest.MonkeyPatch, dummy: Host) -> None:
    monkeypatch.setenv("SHM_MODEL_MODE", "shared")
    monkeypatch.setenv("SHM_MODEL_SOCKET", dummy.socket)
    monkeypatch.setenv("CHAT_API_KEY", "chat-secret")
    monkeypatch.setenv("API_KEY", "api-secret")


def test_a_job_over_its_time_limit_is_killed_and_the_next_one_runs(
    dummy: Host, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A file that blocks its reader for ever (a FIFO nobody writes) stands for a parser that hangs.
    The limit leaves room for the second job: a one-line file takes 5-10 s to ingest on a slow
    day, most of it the Korean analyser's start-up."""
    secrets_env(monkeypatch, dummy)
    stuck = tmp_path / "stuck.txt"
    os.mkfifo(stuck)
    fine = tmp_path / "fine.txt"
    fine.write_text("서울특별시 인구는 940만 명이다.", encoding="utf-8")
    jobs = Jobs(api_server.Settings(db=str(tmp_path / "rag.db"), job_timeout=20, keep_uploads=True))
    try:
        started = time.time()
        first = jobs.submit([str(stuck)])
        second = jobs.submit([str(fine)])
        poll(lambda: first.state == "running" and jobs._procs, 10, what="the first job's process")
        (pid,) = list(jobs._procs)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith((b"CHAT_API_KEY=", b"API_KEY=")) for v in environ)
        assert any(v.startswith(b"RAG_DB=") for v in environ)
        assert second.state == "queued"
        poll(lambda: first.finished, 45, what="the first job to be stopped")
        assert first.state == "failed" and "API_JOB_TIMEOUT=20s" in first.message
        assert 19.5 < first.finished - started < 40, (first.finished - started, first.to_dict())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        poll(lambda: second.finished, 60, what="the second job")
        assert second.state == "done" and second.done == ["fine.txt"] and second.chunks == 1, second
    finally:
        jobs.stop()


def test_a_full_job_queue_is_429(app_for: Any, tmp_path: Path) -> None:
    api = app_for(job_queue=1, job_timeout=60)
    jobs: Jobs = api.app.state.api.jobs
    stuck = tmp_path / "stuck.txt"
    os.mkfifo(stuck)
    running = jobs.submit([str(stuck)])
    poll(lambda: running.state == "running", 10, what="the running job")
    waiting = jobs.submit([str(stuck)])
    refused = api.post("/documents", files=[("files", ("a.txt", b"text", "text/plain"))])
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
    assert refused.json()["error"]["code"] == "overloaded"
    assert not any((tmp_path / "uploads").rglob("a.txt"))  # a refused upload is not kept
    assert waiting.state == "queued"


def test_uploads_keep_their_names_apart_and_are_deleted_after_ingestion(app_for: Any, tmp_path: Path) -> None:
    kept = app_for(keep_uploads=True, upload_dir=str(tmp_path / "kept"))
    same = [("files", ("같은.txt", b"first text", "text/plain")), ("files", ("같은.txt", b"second text", "text/plain"))]
    accepted = kept.post("/documents", files=same)
    assert accepted.status_code == 202 and accepted.json()["files"] == ["같은.txt", "같은.txt"]
    job = poll(lambda: (j := kept.get(accepted.json()["status_url"]).json())["finished"] and j, 60, what="the job")
    assert job["state"] == "done" and job["processed"] == 2, job
    stored = sorted(p.read_bytes() for p in (tmp_path / "kept").rglob("같은.txt"))
    assert stored == [b"first text", b"second text"]

    deleting = app_for(upload_dir=str(tmp_path / "deleted"))
    long_name = "가" * 196 + ".txt"
    accepted = deleting.post("/documents", files=[("files", (long_name, "긴 이름의 문서".encode(), "text/plain"))])
    assert accepted.status_code == 202, accepted.text
    (name,) = accepted.json()["files"]
    assert name.endswith(".txt") and len(name.encode()) <= 200 and long_name.startswith(name[:-4])
    job = poll(lambda: (j := deleting.get(accepted.json()["status_url"]).json())["finished"] and j, 60, what="job")
    assert job["state"] == "done" and job["errors"] == {}, job
    assert not [p for p in (tmp_path / "deleted").rglob("*") if p.is_file()]
