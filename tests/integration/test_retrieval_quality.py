"""Look-alike documents: contextual chunks, tables across pages, boilerplate, and the figures of
the evaluation collection (BM25 here; the multilingual model through the API when slow tests run)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tablerag import collection
from tablerag.chunking import TokenCounter, chunk_blocks
from tablerag.documents import parse
from tablerag.evaluate import evaluate
from tablerag.ingest import Ingestor
from tablerag.retrieval import Retriever
from tablerag.store import SQLiteStore
from tests.conftest import ROOT, api_server, base_env, launch
from tests.integration.test_rag import HashModel


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("collection")
    collection.write_collection(path)
    return path


def test_the_collection_is_in_every_format_with_labelled_questions(folder: Path) -> None:
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) >= 25 and {Path(f).suffix for f in files} == {
        ".pdf",
        ".docx",
        ".html",
        ".md",
        ".csv",
        ".xlsx",
        ".txt",
    }
    questions = collection.questions()
    kinds = {q.kind for q in questions}
    assert kinds == set(collection.KINDS) and sum(q.kind == "unanswerable" for q in questions) >= 20
    assert len([q for q in questions if q.file]) >= 150
    assert all(q.file in files and q.answer for q in questions if q.kind != "unanswerable")


def test_a_ruled_pdf_table_continued_on_the_next_page_keeps_its_header(folder: Path) -> None:
    blocks = parse(folder / collection.library_file(2024))
    (table,) = [b.table for b in blocks if b.table is not None]
    rows = collection.library_rows(2024)
    assert table.header == collection.LIBRARY_HEADER and table.rows == rows  # page 2's first row is a row
    assert [b.text for b in blocks if b.location.get("furniture")] == ["자료: 가온시 평생학습과 도서관운영팀"]


def test_rows_of_look_alike_documents_carry_their_documents_context(folder: Path) -> None:
    count = TokenCounter(None)
    texts = []
    for year in (2023, 2024):
        name = collection.centre_file(0, year)
        chunks = chunk_blocks(parse(folder / name), count, name=name)
        texts.append(next(c.text for c in chunks if c.kind == "row" and c.row and c.row["프로그램"] == "수영"))
    for year, text in zip((2023, 2024), texts, strict=True):
        context, place, cells = text.split("\n")
        assert f"한빛체육센터 {year}년" in context and "동구 시설관리공단" in context
        assert place.endswith("1. 프로그램 현황 | 표 1. 프로그램별 월 이용료와 정원") and cells.startswith(
            "프로그램: 수영"
        )
    md = collection.parking_file(0)
    (row, *_) = [c for c in chunk_blocks(parse(folder / md), count, name=md) if c.kind == "row"]
    assert row.text.startswith("가온시 공영주차장 요금 안내\n차종: 경차")  # the heading, not the sentence above
    sheets = parse(folder / collection.population_file(0))
    assert [b.location["sheet"] for b in sheets] == ["2021년", "2022년", "2023년"]
    assert all(b.table and b.table.header[1:4] == ["인구(명) 남", "인구(명) 여", "인구(명) 계"] for b in sheets)
    assert all(b.table and not b.table.rows[-1][0].startswith("자료") for b in sheets)  # the source row is not a row


@pytest.fixture(scope="module")
def store(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteStore]:
    with SQLiteStore(str(tmp_path_factory.mktemp("store") / "c.db")) as opened:
        report = Ingestor(opened, HashModel()).ingest([folder])
        assert len(report.added) == len(collection.writers()) and not report.failed
        yield opened


def test_bm25_with_the_reranking_stage_finds_and_answers_on_the_collection(store: SQLiteStore) -> None:
    """Hash vectors carry no meaning, so only BM25 and the reranking stage are measured here."""
    figures = evaluate(Retriever(store, HashModel()), collection.questions(), modes=["bm25"])["modes"]["bm25"]
    overall = figures["all"]
    assert overall["hit@1"] >= 0.9 and overall["recall@5"] >= 0.97, figures
    assert overall["answer"] >= 0.85 and overall["declined"] <= 0.05, figures
    assert overall["no_answer"] >= 0.7, figures
    assert figures["by_kind"]["distractor"]["hit@1"] >= 0.85, figures


@pytest.mark.slow
def test_the_collection_through_the_api_with_the_multilingual_model(folder: Path, tmp_path: Path) -> None:
    """The README's table: ingest through the host, then every question through /search and /chat."""
    from shm_model import e5_model

    model = e5_model.build(tmp_path / "multilingual-e5-small")
    host = launch(tmp_path, MODEL_NAME=str(model))
    try:
        host.wait_ready()
        env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=host.socket, RAG_DB=str(tmp_path / "rag.db"))
        ingest = [sys.executable, str(ROOT / "rag_with_tables.py"), "ingest", str(folder), "--no-progress"]
        subprocess.run(ingest, env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
        with api_server(env | {"API_UPLOAD_DIR": str(tmp_path / "up")}, tmp_path / "api.log") as url:
            result = subprocess.run(
                [sys.executable, str(ROOT / "rag_with_tables.py"), "evaluate", "--collection", "--api", url, "--json"],
                env=env, cwd=ROOT, check=True, capture_output=True, text=True, timeout=1200,
            )  # fmt: skip
    finally:
        host.terminate()
    overall = json.loads(result.stdout)["modes"]["hybrid"]["all"]
    assert overall["hit@1"] >= 0.9 and overall["recall@5"] >= 0.97 and overall["answer"] >= 0.9, overall
    assert overall["declined"] <= 0.05, overall


def test_a_store_of_the_old_chunker_is_rechunked_on_ingest(folder: Path, tmp_path: Path) -> None:
    files = [folder / collection.tariff_file(2023), folder / collection.tariff_file(2024)]
    with SQLiteStore(str(tmp_path / "old.db")) as store:
        ingestor = Ingestor(store, HashModel())
        assert len(ingestor.ingest(files).added) == 2 and store.stats()["chunker"] == "2"
        store.set_setting("chunker", "1")  # as a store made before contextual chunks
        assert len(ingestor.ingest(files).replaced) == 2 and store.stats()["chunker"] == "2"
        assert len(ingestor.ingest(files).unchanged) == 2


def test_evidence_needs_the_names_years_and_row_the_question_points_at() -> None:
    from tablerag.chunking import names, names_in
    from tablerag.retrieval import _points_at

    assert names("시립남부병원 내과 진료 시간은?") == {"시립남부병원"} and names("북구에서 몇 시에") == {"북구"}
    assert not names("한 달 배우려면 얼마를 내야 하나요?")  # verbs ending in 면/시 are not names
    assert names_in({"가온행보도서관"}, "도서관명: 가온행복도서관") and not names_in({"시립남부병원"}, "시립북부병원")
    row = {"진료과": "내과", "평일 진료 시간": "08:30~17:00"}
    assert _points_at("시립중앙병원 내과 평일 진료 시간", row) and not _points_at("시립중앙병원 치과 진료 시간", row)
    assert _points_at("수영 강습 시간", {"프로그램": "순영"}) and not _points_at("약학 계열", {"계열": "의학"})
    assert _points_at("400kWh를 넘게 쓰면 기본요금은?", {"구간": "3단계", "월 사용량(kWh)": "400 초과"})
