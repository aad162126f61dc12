"""The SQLite document store in process: documents replaced atomically, the model check, exact
dense search and its cache, hits with their tables, re-indexing, and the errors users see."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tablerag.chunking import Chunk
from tablerag.documents import Table
from tablerag.store import DocumentInput, Hit, ModelMismatch, PgStore, SQLiteStore, StoreError, open_store

FEES = Table(["과목", "수강료"], [["수영", "30,000원"], ["요가", "25,000원"]], "표 1. 강좌별 수강료")


def document(path: str, vectors: list[list[float]], *, sha: str = "h1", tables: bool = True) -> DocumentInput:
    """A document of one text chunk and, with ``tables``, one row chunk of FEES."""
    chunks = [Chunk("text", f"{path} 소개", {"page": 1})]
    if tables:
        chunks.append(Chunk("row", "수영 30,000원", {"page": 2}, table=0, row={"과목": "수영", "수강료": "30,000원"}))
    chunks = chunks[: len(vectors)]
    return DocumentInput(
        path=path,
        sha256=sha,
        size=123,
        tables=[(FEES, {"page": 2})] if tables else [],
        chunks=chunks,
        terms=[["소개", path], ["수영", "수강료"]][: len(chunks)],
        vectors=np.asarray(vectors, dtype=np.float32),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(str(tmp_path / "sub" / "rag.db"))
    yield opened
    opened.close()


def test_a_new_store_is_an_empty_private_file_with_no_model(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rag.db"
    with SQLiteStore(str(path)) as store:
        assert store.location == store.path == str(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert store.model() is None
        assert store.generation() == 0
        assert store.setting("schema") == "1"
        assert store.dense(np.ones(3, dtype=np.float32), 5) == []
        assert store.hits([]) == []
        assert store.documents() == []
        assert store.stats() == {
            "store": str(path),
            "bytes": os.path.getsize(path),
            "model": None,
            "dimension": None,
            "documents": 0,
            "tables": 0,
            "chunks": 0,
            "chunker": "1",
            "chunks_by_kind": {},
        }
        assert store.stats()["bytes"] > 0


def test_a_file_that_is_not_sqlite_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database, just text long enough to fill a header" * 4)
    with pytest.raises(StoreError, match=r"notes\.txt is not a usable SQLite store"):
        SQLiteStore(str(path))


def test_reopening_keeps_generation_settings_and_model(tmp_path: Path) -> None:
    path = str(tmp_path / "rag.db")
    with SQLiteStore(path) as store:
        store.check_model("m", 2)
        store.replace_document(document("/a", [[1, 0]], tables=False), 1.0)
        store.set_setting("chunker", "2")
    with SQLiteStore(path) as store:
        assert store.generation() == 1
        assert store.setting("chunker") == "2"
        assert store.stats()["chunker"] == "2"
        assert store.model() == ("m", 2)
        assert store.setting("nothing") is None


def test_the_first_model_is_adopted_and_another_name_or_dimension_refused(store: SQLiteStore) -> None:
    store.check_model("model-a", 32)
    assert store.model() == ("model-a", 32)
    store.check_model("model-a", 32)  # the same model again
    with pytest.raises(ModelMismatch, match=r"model 'model-a' \(dimension 32\).*'model-b' \(dimension 32\).*reindex"):
        store.check_model("model-b", 32)
    with pytest.raises(ModelMismatch, match=r"'model-a' \(dimension 32\).*'model-a' \(dimension 48\)"):
        store.check_model("model-a", 48)
    with pytest.raises(ModelMismatch, match=store.path):
        store.check_model("model-a", 31)
    assert store.model() == ("model-a", 32)


def test_a_document_is_stored_with_its_tables_and_found_as_hits(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    doc_id = store.replace_document(document("/docs/a.html", [[1, 0], [0, 1]]), 1700.5)
    assert doc_id >= 1
    assert store.generation() == 1
    assert store.document_hash("/docs/a.html") == "h1"
    assert store.document_hash("/docs/b.html") is None
    assert store.documents() == [
        {"path": "/docs/a.html", "sha256": "h1", "size": 123, "chunks": 2, "ingested_at": 1700.5}
    ]
    stats = store.stats()
    assert (stats["documents"], stats["tables"], stats["chunks"]) == (1, 1, 2)
    assert stats["chunks_by_kind"] == {"text": 1, "row": 1}
    assert (stats["model"], stats["dimension"]) == ("m", 2)

    ids, terms = store.all_terms()
    assert terms == [["소개", "/docs/a.html"], ["수영", "수강료"]]
    assert ids == sorted(ids) and len(set(ids)) == 2

    scored = store.dense(np.array([0.0, 3.0]), 5)
    assert [cid for cid, _ in scored] == [ids[1], ids[0]]
    assert scored[0][1] == pytest.approx(1.0) and scored[1][1] == pytest.approx(0.0, abs=1e-6)

    row_hit, text_hit = store.hits(scored)
    assert row_hit == Hit(
        ids[1],
        scored[0][1],
        "row",
        "수영 30,000원",
        "/docs/a.html",
        {"page": 2},
        {"과목": "수영", "수강료": "30,000원"},
        "표 1. 강좌별 수강료",
        FEES.markdown(),
    )
    assert (text_hit.kind, text_hit.row, text_hit.table_caption, text_hit.table_markdown) == ("text", None, None, None)
    assert text_hit.location == {"page": 1}
    assert row_hit.to_dict()["table_caption"] == "표 1. 강좌별 수강료"
    assert row_hit.to_dict()["evidence"] == 1.0
    assert dict(store.chunk_texts()) == {ids[0]: "/docs/a.html 소개", ids[1]: "수영 30,000원"}


def test_dense_search_ranks_by_cosine_keeps_ties_in_id_order_and_stops_at_k(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    store.replace_document(document("/a", [[10, 0], [0, 1]]), 1.0)  # lengths must not matter
    store.replace_document(document("/b", [[1, 1], [0, 0]]), 1.0)  # a zero vector scores 0, not NaN
    ids, _ = store.all_terms()
    scored = store.dense(np.array([1.0, 0.0]), 4)
    assert [cid for cid, _ in scored] == [ids[0], ids[2], ids[1], ids[3]]
    assert [round(s, 4) for _, s in scored] == [1.0, 0.7071, 0.0, 0.0]
    assert store.dense(np.array([1.0, 0.0]), 1) == scored[:1]
    assert len(store.dense(np.array([1.0, 0.0]), 2)) == 2
    assert store.dense(np.zeros(2), 1) == [(ids[0], 0.0)]  # a zero query: no NaN either


def test_search_sees_every_change_after_it_was_cached(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    store.replace_document(document("/a", [[1, 0]], tables=False), 1.0)
    first = store.dense(np.array([1.0, 0.0]), 5)
    assert len(first) == 1
    store.replace_document(document("/b", [[0, 1]], tables=False), 1.0)
    assert len(store.dense(np.array([1.0, 0.0]), 5)) == 2
    store.remove_document("/a")
    after = store.dense(np.array([1.0, 0.0]), 5)
    assert len(after) == 1 and after[0][0] != first[0][0]


def test_replacing_a_document_drops_its_old_chunks_and_tables(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    store.replace_document(document("/a", [[1, 0], [0, 1]]), 1.0)
    old_ids, _ = store.all_terms()
    store.replace_document(document("/a", [[1, 1]], sha="h2", tables=False), 2.0)
    assert store.generation() == 2
    assert store.document_hash("/a") == "h2"
    stats = store.stats()
    assert (stats["documents"], stats["tables"], stats["chunks"]) == (1, 0, 1)
    new_ids, terms = store.all_terms()
    assert len(new_ids) == 1 and terms == [["소개", "/a"]]
    assert [text for _, text in store.chunk_texts()] == ["/a 소개"]
    # an id scored before the replacement that no longer exists is skipped, not an error
    gone = max(set(old_ids) - set(new_ids))
    assert [h.chunk_id for h in store.hits([(gone, 0.9), (new_ids[0], 0.5)])] == new_ids


def test_a_failed_write_leaves_the_store_as_it_was(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    store.replace_document(document("/a", [[1, 0], [0, 1]]), 1.0)
    before = (store.documents(), store.all_terms(), store.generation())
    broken = document("/a", [[1, 1], [0, 1]], sha="h2")
    broken.vectors = broken.vectors[:1]  # a vector short: fails after the old version was deleted
    with pytest.raises(IndexError):
        store.replace_document(broken, 2.0)
    assert (store.documents(), store.all_terms(), store.generation()) == before
    store.replace_document(document("/b", [[1, 0]], tables=False), 3.0)  # and the store still writes
    assert store.generation() == 2


def test_removing_a_document_bumps_the_generation_only_when_it_was_there(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    store.replace_document(document("/a", [[1, 0], [0, 1]]), 1.0)
    assert store.remove_document("/missing") is False
    assert store.generation() == 1
    assert store.remove_document("/a") is True
    assert store.generation() == 2
    stats = store.stats()
    assert (stats["documents"], stats["tables"], stats["chunks"]) == (0, 0, 0)
    assert store.remove_document("/a") is False


def test_reindexing_replaces_every_vector_and_the_model(store: SQLiteStore) -> None:
    store.check_model("old", 2)
    store.replace_document(document("/a", [[1, 0], [0, 1]]), 1.0)
    ids = [cid for cid, _ in store.chunk_texts()]
    with pytest.raises(StoreError, match=r"^the store changed while it was being re-indexed; run reindex again$"):
        store.replace_vectors("new", 3, ids[:1], np.zeros((1, 3), dtype=np.float32))
    assert store.model() == ("old", 2) and store.generation() == 1
    store.replace_vectors("new", 3, ids, np.array([[0, 0, 1], [1, 0, 0]], dtype=np.float32))
    assert store.model() == ("new", 3)
    assert store.generation() == 2
    store.check_model("new", 3)
    with pytest.raises(ModelMismatch):
        store.check_model("old", 2)
    assert [cid for cid, _ in store.dense(np.array([0.0, 0.0, 1.0]), 1)] == [ids[0]]
    assert [cid for cid, _ in store.dense(np.array([1.0, 0.0, 0.0]), 1)] == [ids[1]]


def test_two_threads_writing_documents_lose_none(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    errors: list[BaseException] = []

    def write(prefix: str) -> None:
        try:
            for i in range(20):
                store.replace_document(document(f"/{prefix}{i}", [[1, i]], tables=False), 1.0)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.stats()["documents"] == 40
    assert store.generation() == 40


def test_open_store_picks_sqlite_for_a_path_and_postgres_for_a_url(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "x.db")) as store:
        assert isinstance(store, SQLiteStore)
    for scheme in ("postgresql", "postgres"):
        # a socket directory that does not exist fails at once, without a network
        url = f"{scheme}://reader:s3cret@/rag?host={tmp_path}/no-such-dir"
        with pytest.raises(StoreError, match="cannot use the PostgreSQL store") as caught:
            open_store(url)
        assert "s3cret" not in str(caught.value)
        assert f"{scheme}://reader:***@" in str(caught.value)


def test_a_postgres_schema_name_that_is_not_an_identifier_is_refused_before_connecting() -> None:
    with pytest.raises(StoreError, match="invalid schema name 'rag; DROP TABLE x'"):
        PgStore("postgresql://u:p@/db?host=/nonexistent", schema="rag; DROP TABLE x")


def test_tables_are_stored_with_their_header_and_location(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    doc_id = store.replace_document(document("/a", [[1, 0], [0, 1]]), 1.0)
    rows = store._db.execute("SELECT document_id, ordinal, caption, location, header, markdown FROM tables").fetchall()
    assert rows == [(doc_id, 0, FEES.caption, '{"page":2}', '["과목","수강료"]', FEES.markdown())]


def test_a_row_of_a_table_without_a_caption_keeps_its_cells(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    doc = document("/a", [[1, 0], [0, 1]])
    doc.tables = [(Table(FEES.header, FEES.rows, ""), {})]
    store.replace_document(doc, 1.0)
    row_hit = store.hits(store.dense(np.array([0.0, 1.0]), 1))[0]
    assert (row_hit.row, row_hit.table_caption) == ({"과목": "수영", "수강료": "30,000원"}, "")


def test_a_store_with_a_model_name_but_no_dimension_has_no_model(store: SQLiteStore) -> None:
    store.set_setting("model", "m")
    assert store.model() is None
    store.check_model("m", 4)  # adopted whole
    assert store.model() == ("m", 4)


def test_scores_are_cosines_whatever_the_lengths_and_dtype_of_the_vectors(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    doc = document("/a", [[0.3, 0.4], [0.0, 0.5]])
    doc.vectors = doc.vectors.astype(np.float64)  # stored as float32 all the same
    store.replace_document(doc, 1.0)
    ids, _ = store.all_terms()
    scored = store.dense(np.array([0.06, 0.08]), 2)  # short query and short vectors: still cosines
    assert [cid for cid, _ in scored] == ids
    assert [round(s, 6) for _, s in scored] == [1.0, 0.8]


def test_equal_scores_keep_the_order_the_chunks_were_stored_in(store: SQLiteStore) -> None:
    store.check_model("m", 2)
    directions = [[1, 0], [1, 1], [0, 1]]
    for i in range(40):  # three directions, mixed: ties among other scores
        store.replace_document(document(f"/d{i:02}", [directions[(i * 7) % 3]], tables=False), 1.0)
    ids, _ = store.all_terms()
    ranked = [cid for cid, _ in store.dense(np.array([1.0, 0.0]), 40)]
    by_direction = [[cid for i, cid in enumerate(ids) if (i * 7) % 3 == d] for d in range(3)]
    assert ranked == by_direction[0] + by_direction[1] + by_direction[2]
