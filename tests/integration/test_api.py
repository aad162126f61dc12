"""api_server.py: every endpoint, every error status, OpenAI clients, a real uvicorn, the chat page."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from shm_model import errors
from shm_model.client import HostClient
from shm_model.manager import ModelManager
from tablerag import samples
from tests.conftest import ROOT, Host, api_server, base_env, poll


@pytest.fixture(scope="module")
def store_path(bundled_host: Host, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with the sample corpus, ingested through the bundled host."""
    folder = tmp_path_factory.mktemp("api")
    samples.write_corpus(folder / "docs")
    db = str(folder / "rag.db")
    env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=bundled_host.socket, RAG_DB=db)
    subprocess.run(
        [sys.executable, str(ROOT / "rag_with_tables.py"), "ingest", str(folder / "docs")],
        env=env, cwd=ROOT, check=True, capture_output=True, timeout=240,
    )  # fmt: skip
    return db


@pytest.fixture
def app_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Builds an app on a socket and a store, with its own ModelManager; closed afterwards."""
    import api_server

    clients: list[TestClient] = []

    def make(sock: str, db: str, **settings: Any) -> TestClient:
        monkeypatch.setenv("SHM_MODEL_MODE", "shared")
        monkeypatch.setenv("SHM_MODEL_SOCKET", sock)
        monkeypatch.setenv("RAG_DB", db)
        monkeypatch.setenv("API_UPLOAD_DIR", str(tmp_path / "uploads"))
        ModelManager.reset_instance()
        client = TestClient(api_server.create_app(api_server.Settings.load(**settings)), base_url="http://localhost")
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    ModelManager.reset_instance()


def host_vectors(host: Host, texts: list[str]) -> np.ndarray:
    with HostClient(host.socket, timeout=30) as client:
        return client.encode(texts, normalize_embeddings=True)


# --- endpoints ----------------------------------------------------------------------------------


def test_health_status_and_metrics(app_for, bundled_host: Host, store_path: str) -> None:
    api = app_for(bundled_host.socket, store_path)
    assert api.get("/health/live").json() == {"status": "ok"}
    ready = api.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    status = api.get("/model/status").json()
    assert status["is_loaded"] and status["mode"] == "shared" and status["dimension"] == 384
    assert status["worker_count"] == 2 and len(status["host"]["workers"]) == 2
    metrics = api.get("/metrics").text
    assert "shm_model_host_workers 2.0" in metrics and "shm_model_requests_total" in metrics


def test_openai_compatible_embeddings(app_for, bundled_host: Host, store_path: str) -> None:
    api = app_for(bundled_host.socket, store_path)
    texts = ["서울특별시 인구", "hello world"]
    expected = host_vectors(bundled_host, texts)
    floats = api.post("/v1/embeddings", json={"input": texts, "model": "bundled"}).json()
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["object"] == "list"
    assert np.abs(np.array([d["embedding"] for d in floats["data"]]) - expected).max() < 1e-6
    packed = api.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.abs(vector - expected[0]).max() < 1e-6 and packed["usage"]["prompt_tokens"] > 0
    models = api.get("/v1/models").json()
    assert models["data"][0]["id"] == floats["model"]


def test_search_and_chat_answer_from_a_table_row(app_for, bundled_host: Host, store_path: str) -> None:
    api = app_for(bundled_host.socket, store_path)
    found = api.post("/search", json={"query": "서울특별시 2023년 인구", "k": 5, "mode": "bm25"}).json()
    top = found["results"][0]
    assert top["row"]["시도"] == "서울특별시" and top["document"] == samples.HTML and "| 서울특별시 |" in top["table"]
    chat = api.post("/chat", json={"question": "서울특별시 2023년 인구는?"}).json()
    assert chat["answer_type"] == "extracted" and "인구(만 명) 2023년: 940" in chat["answer"]
    assert any(s["row"] and s["row"].get("시도") == "서울특별시" for s in chat["sources"])
    with api.stream("POST", "/chat", json={"question": "서울특별시 2023년 인구는?", "stream": True}) as response:
        events = response.read().decode()
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events.startswith("event: sources\n") and "940" in events and events.rstrip().endswith("data: {}")


class FakeChatModel:
    """An OpenAI-compatible /chat/completions that streams a fixed answer and keeps the prompts."""

    def __init__(self) -> None:
        import http.server
        import threading

        fake = self
        self.requests: list[dict[str, Any]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                fake.requests.append({"path": self.path, "auth": self.headers.get("authorization"), **json.loads(body)})
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for piece in ("서울특별시의 2023년 인구는 ", "940만 명입니다 [1]."):
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                    self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def test_chat_generates_with_a_configured_chat_model(app_for, bundled_host: Host, store_path: str) -> None:
    fake = FakeChatModel()
    try:
        api = app_for(bundled_host.socket, store_path, chat_base=fake.url, chat_model="m", chat_key="k")
        chat = api.post("/chat", json={"question": "서울특별시 2023년 인구는?"}).json()
        assert chat["answer_type"] == "generated" and chat["answer"] == "서울특별시의 2023년 인구는 940만 명입니다 [1]."
        (sent,) = fake.requests
        assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer k" and sent["model"] == "m"
        assert "[1] 시도별_인구.html" in sent["messages"][1]["content"]  # the retrieved rows are the context
        assert "인구(만 명) 2023년: 940" in sent["messages"][1]["content"]
        with api.stream("POST", "/chat", json={"question": "서울특별시 2023년 인구는?", "stream": True}) as response:
            events = response.read().decode()
        assert '"answer_type": "generated"' in events and '"delta": "940만 명입니다 [1]."' in events
    finally:
        fake.server.shutdown()


def test_bad_input_is_422_and_large_bodies_413(app_for, bundled_host: Host, store_path: str) -> None:
    api = app_for(bundled_host.socket, store_path, max_json_bytes=10_000)
    cases = [
        ("/v1/embeddings", {"input": []}, "input must not be empty"),
        ("/v1/embeddings", {"input": ["ok", ""]}, "input[1] is an empty string"),
        ("/v1/embeddings", {"input": ["ok", 3]}, "input"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ("/chat", {"question": ""}, "question"),
        ("/chat", {"question": " \r\n "}, "question: only whitespace"),
        ("/search", {"query": "\t"}, "query: only whitespace"),
        ("/search", {"query": "x", "k": 0}, "k"),
        ("/search", {"query": "x", "mode": "fuzzy"}, "mode"),
    ]
    for path, body, words in cases:
        response = api.post(path, json=body)
        assert response.status_code == 422, (path, body, response.text)
        assert words in response.json()["error"]["message"], response.json()
    big = api.post("/v1/embeddings", json={"input": ["가" * 20_000]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"input": ["'
        for _ in range(100):
            yield "가".encode() * 100
        yield b'"]}'

    streamed = api.post("/v1/embeddings", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
    small = api.post(
        "/v1/embeddings", content=iter([b'{"input": ', b'"ok"}']), headers={"content-type": "application/json"}
    )
    assert small.status_code == 200 and len(small.json()["data"]) == 1
    assert api.post("/chat", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422


def test_json_bodies_are_parsed_by_orjson_on_every_route(app_for, tmp_path: Path) -> None:
    """orjson refuses NaN, which the standard library's parser takes; so a NaN refused as JSON on
    every route with a JSON body in the OpenAPI schema shows orjson parsed it (a large body holds
    the event loop a third as long)."""
    api = app_for(str(tmp_path / "no-host.sock"), str(tmp_path / "rag.db"))
    routes = [
        (path, method)
        for path, operations in api.app.openapi()["paths"].items()
        for method, operation in operations.items()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    ]
    assert {"/v1/embeddings", "/embed", "/", "/tokenize", "/search", "/chat"} <= {path for path, _ in routes}
    refused = "the body is not valid JSON at character 0: unexpected character, expected a JSON value"
    for path, method in routes:
        response = api.request(method, path, content=b"NaN", headers={"content-type": "application/json"})
        assert response.status_code == 422, (path, response.text)
        message = response.json()["error"]
        assert (message if isinstance(message, str) else message["message"]) == refused, (path, message)
    unfinished = api.post("/chat", content=b'{"question": ', headers={"content-type": "application/json"})
    assert unfinished.status_code == 422 and "not valid JSON at character 13" in unfinished.text


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.Overloaded("the queue is full"), 429),
        (errors.HostUnavailable("no host"), 503),
        (errors.RequestTimeout("too slow"), 504),
        (errors.PayloadTooLarge("frame too large"), 413),
        (errors.BadRequest("text 3 is not a string"), 422),
    ],
)
def test_host_errors_map_to_http_statuses(app_for, bundled_host: Host, store_path: str, monkeypatch, error, status):
    api = app_for(bundled_host.socket, store_path)

    def failing(self: Any, sentences: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr("shm_model.manager.ManagedModel.encode", failing)
    response = api.post("/v1/embeddings", json={"input": "x"})
    assert response.status_code == status and response.json()["error"]["code"] == error.code
    assert response.json()["error"]["message"] == error.message
    if status == 429:
        assert response.headers["retry-after"] == "1"


def test_a_host_that_comes_back_is_picked_up_again(app_for, host_factory, tmp_path: Path) -> None:
    sock = str(tmp_path / "run" / "host.sock")
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_SOCKET=sock)
    api = app_for(sock, str(tmp_path / "rag.db"))
    assert api.post("/v1/embeddings", json={"input": "x"}).status_code == 200
    host.terminate(timeout=20)
    gone = api.post("/v1/embeddings", json={"input": "x"})
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "host_unavailable"
    assert api.get("/health/ready").status_code == 503
    host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_SOCKET=sock)
    assert api.post("/v1/embeddings", json={"input": "x"}).status_code == 200
    assert api.get("/health/ready").status_code == 200


def test_document_upload_runs_an_ingestion_job(app_for, bundled_host: Host, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    samples.write_corpus(folder)
    api = app_for(bundled_host.socket, str(tmp_path / "rag.db"))
    files = [
        ("files", (samples.CSV, (folder / samples.CSV).read_bytes(), "text/csv")),
        ("files", (samples.XLSX, (folder / samples.XLSX).read_bytes(), "application/octet-stream")),
        ("files", ("빈파일.txt", b"", "text/plain")),
    ]
    accepted = api.post("/documents", files=files)
    assert accepted.status_code == 202, accepted.text
    url = accepted.json()["status_url"]
    job = poll(lambda: (j := api.get(url).json())["state"] in ("done", "failed") and j, 120, what="ingestion job")
    assert job["state"] == "done" and job["files"] == 3 and job["processed"] == 3 and job["progress"] == 1.0
    assert list(job["errors"].values()) == ["empty file"] and job["chunks"] > 5
    found = api.post("/search", json={"query": "정보화담당관 현원", "mode": "bm25"}).json()["results"]
    assert any(r["row"] and r["row"].get("인원 현원") == "7" for r in found)
    bad = api.post("/documents", files=[("files", ("notes.exe", b"MZ", "application/octet-stream"))])
    assert bad.status_code == 422 and "unsupported file type" in bad.json()["error"]["message"]
    assert api.get("/documents/jobs/nope").status_code == 404


# --- a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(bundled_host: Host, store_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=bundled_host.socket, RAG_DB=store_path)
    with api_server(env, tmp_path_factory.mktemp("uvicorn") / "api.log") as url:
        yield url


def test_the_openai_client_over_http(server: str, bundled_host: Host) -> None:
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    texts = ["도서관 대출 규정", "parking fees"]
    result = client.embeddings.create(model="bundled", input=texts)
    got = np.array([d.embedding for d in result.data])
    assert np.abs(got - host_vectors(bundled_host, texts)).max() < 1e-6
    assert [m.id for m in client.models.list()] == [result.model]
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model="bundled", input=[])


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_chat_page_in_a_real_browser(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    if executable is None and os.environ.get("CI"):
        pytest.fail("Chromium is missing: scripts/install.sh installs Debian's chromium")
    if executable is None:
        pytest.skip("no Chromium on this machine (scripts/install.sh installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(server + "/")
            page.fill("#question", "서울특별시 2023년 인구는?")
            page.click("#send")
            answer = page.locator(".a .answer").first
            answer.wait_for(timeout=30_000)
            assert "940" in answer.inner_text()
            assert "문서에서 추출한 답변" in page.locator(".a .label").first.inner_text()
            source = page.locator(".source").filter(has_text=samples.HTML).first
            assert "서울특별시" in source.locator("tr.hit").first.inner_text()
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            assert (tmp_path / "chat.png").stat().st_size > 10_000
        finally:
            browser.close()


# --- schema-driven HTTP fuzzing -----------------------------------------------------------------


def test_no_input_from_the_openapi_schema_gets_a_500(server: str) -> None:
    """schemathesis generates requests for every operation of the OpenAPI schema (uploads aside)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    def examples(operation: Any, seen: dict[int, int]) -> Any:
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(base_url=server, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        return check

    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    calls: dict[str, dict[int, int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/documents"):
            continue  # multipart uploads start ingestion jobs; tested above
        seen = calls.setdefault(f"{operation.method.upper()} {operation.path}", {})
        examples(operation, seen)()
    print(f"\nschemathesis: {calls}")
    assert len(calls) >= 8 and sum(sum(c.values()) for c in calls.values()) > 100
