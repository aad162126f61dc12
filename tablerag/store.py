"""The document store: documents, tables, chunks, vectors and BM25 terms.

``SQLiteStore`` keeps it all in one file and needs no server (dense search is exact: a
matrix product over all vectors, cached until the store changes); ``PgStore`` keeps it
in PostgreSQL with pgvector (an HNSW index) for users who outgrow one file. Both write
each document in one transaction (a killed ingestion leaves the store as it was before
that document), record the embedding model's name and dimension, and refuse vectors
from another model. ``open_store`` picks one from a path or a ``postgresql://`` URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tablerag.chunking import Chunk, dumps
from tablerag.documents import Table

SCHEMA_VERSION = "1"

#: Tables of both dialects; ``{id}``, ``{blob}`` and ``{vector}`` are filled in per dialect.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id {id},
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    chunks INTEGER NOT NULL,
    ingested_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS tables (
    id {id},
    document_id BIGINT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    caption TEXT NOT NULL,
    location TEXT NOT NULL,
    header TEXT NOT NULL,
    markdown TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id {id},
    document_id BIGINT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    location TEXT NOT NULL,
    table_id BIGINT REFERENCES tables(id) ON DELETE CASCADE,
    row TEXT,
    terms TEXT NOT NULL,
    vector {vector} NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document_id);
CREATE INDEX IF NOT EXISTS tables_document ON tables(document_id);
"""


class StoreError(Exception):
    """The store cannot be used as asked (another model's vectors, a broken file)."""


class ModelMismatch(StoreError):
    pass


@dataclass
class Hit:
    chunk_id: int
    score: float
    kind: str
    text: str
    path: str
    location: dict[str, Any]
    row: dict[str, str] | None
    table_caption: str | None
    table_markdown: str | None
    evidence: float = 1.0  # share of the question's distinctive words found in the chunk, year-checked

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DocumentInput:
    path: str
    sha256: str
    size: int
    tables: list[tuple[Table, dict[str, Any]]]  # each table with its location
    chunks: list[Chunk]
    terms: list[list[str]]
    vectors: np.ndarray


class Store:
    """What both dialects share. SQL is written with ``?`` placeholders."""

    location = ""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # --- to be provided by a dialect --------------------------------------------------

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        raise NotImplementedError

    def transaction(self) -> Any:
        raise NotImplementedError

    def _vector_param(self, vector: np.ndarray) -> Any:
        raise NotImplementedError

    def _on_model(self, dimension: int) -> None:
        """Called in the transaction that sets the store's model (e.g. to build an index)."""

    def _drop_vector_index(self) -> None:
        """Called before every vector is replaced (e.g. by another dimension)."""

    def dense(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        raise NotImplementedError

    def size_bytes(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- metadata ---------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self._execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._execute("DELETE FROM meta WHERE key = ?", (key,))
        self._execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _init_meta(self) -> None:
        with self.transaction():
            if self._meta("schema") is None:
                self._set_meta("schema", SCHEMA_VERSION)
                self._set_meta("generation", "0")

    def _bump(self) -> None:
        self._set_meta("generation", str(self.generation() + 1))

    def setting(self, key: str) -> str | None:
        """A value recorded in the store's metadata (e.g. ``chunker``), or None."""
        return self._meta(key)

    def set_setting(self, key: str, value: str) -> None:
        with self.transaction():
            self._set_meta(key, value)

    def generation(self) -> int:
        return int(self._meta("generation") or 0)

    def model(self) -> tuple[str, int] | None:
        rows = dict(self._execute("SELECT key, value FROM meta WHERE key IN ('model', 'dimension')").fetchall())
        name, dim = rows.get("model"), rows.get("dimension")  # one statement: one consistent reading
        return None if name is None or dim is None else (str(name), int(dim))

    def check_model(self, name: str, dimension: int) -> None:
        """Adopt the model when the store has none; refuse another model's vectors. Only the
        adoption takes the write lock: searches call this on every request."""
        current = self.model()
        if current is None:
            with self.transaction():
                current = self.model()
                if current is None:
                    self._set_meta("model", name)
                    self._set_meta("dimension", str(dimension))
                    self._on_model(dimension)
                    return
        if current != (name, dimension):
            raise ModelMismatch(
                f"the store {self.location} holds vectors of model {current[0]!r} (dimension {current[1]}), "
                f"but the model now is {name!r} (dimension {dimension}); run "
                f"'rag_with_tables.py reindex' to re-embed every chunk with it, or use another --db"
            )

    # --- documents --------------------------------------------------------------------

    def document_hash(self, path: str) -> str | None:
        row = self._execute("SELECT sha256 FROM documents WHERE path = ?", (path,)).fetchone()
        return None if row is None else str(row[0])

    def replace_document(self, doc: DocumentInput, ingested_at: float) -> int:
        """Replace the document at ``doc.path`` (if any) with this version, atomically."""
        with self.transaction():
            self._execute("DELETE FROM documents WHERE path = ?", (doc.path,))
            doc_id = int(
                self._execute(
                    "INSERT INTO documents(path, sha256, size, chunks, ingested_at)"
                    " VALUES (?, ?, ?, ?, ?) RETURNING id",
                    (doc.path, doc.sha256, doc.size, len(doc.chunks), ingested_at),
                ).fetchone()[0]
            )
            table_ids = [
                int(
                    self._execute(
                        "INSERT INTO tables(document_id, ordinal, caption, location, header, markdown)"
                        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                        (doc_id, ordinal, table.caption, dumps(location), dumps(table.header), table.markdown()),
                    ).fetchone()[0]
                )
                for ordinal, (table, location) in enumerate(doc.tables)
            ]
            self._executemany(
                "INSERT INTO chunks(document_id, ordinal, kind, text, location, table_id, row, terms, vector)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        doc_id,
                        i,
                        chunk.kind,
                        chunk.text,
                        dumps(chunk.location),
                        None if chunk.table is None else table_ids[chunk.table],
                        None if chunk.row is None else dumps(chunk.row),
                        " ".join(doc.terms[i]),
                        self._vector_param(doc.vectors[i]),
                    )
                    for i, chunk in enumerate(doc.chunks)
                ],
            )
            self._bump()
        return doc_id

    def remove_document(self, path: str) -> bool:
        with self.transaction():
            removed = self._execute("DELETE FROM documents WHERE path = ?", (path,)).rowcount > 0
            if removed:
                self._bump()
        return removed

    def documents(self) -> list[dict[str, Any]]:
        rows = self._execute("SELECT path, sha256, size, chunks, ingested_at FROM documents ORDER BY path").fetchall()
        return [dict(zip(("path", "sha256", "size", "chunks", "ingested_at"), r, strict=True)) for r in rows]

    def stats(self) -> dict[str, Any]:
        by_kind = {k: int(n) for k, n in self._execute("SELECT kind, COUNT(*) FROM chunks GROUP BY kind").fetchall()}
        model = self.model()
        return {
            "store": self.location,
            "bytes": self.size_bytes(),
            "model": model[0] if model else None,
            "dimension": model[1] if model else None,
            "documents": int(self._execute("SELECT COUNT(*) FROM documents").fetchone()[0]),
            "tables": int(self._execute("SELECT COUNT(*) FROM tables").fetchone()[0]),
            "chunks": sum(by_kind.values()),
            "chunker": self._meta("chunker") or "1",
            "chunks_by_kind": by_kind,
        }

    # --- retrieval --------------------------------------------------------------------

    def all_terms(self) -> tuple[list[int], list[list[str]]]:
        rows = self._execute("SELECT id, terms FROM chunks ORDER BY id").fetchall()
        return [int(r[0]) for r in rows], [str(r[1]).split() for r in rows]

    def hits(self, scored: Sequence[tuple[int, float]]) -> list[Hit]:
        if not scored:
            return []
        marks = ",".join("?" * len(scored))
        rows = self._execute(
            "SELECT c.id, c.kind, c.text, d.path, c.location, c.row, t.caption, t.markdown"
            " FROM chunks c JOIN documents d ON d.id = c.document_id LEFT JOIN tables t ON t.id = c.table_id"
            f" WHERE c.id IN ({marks})",
            [cid for cid, _ in scored],
        ).fetchall()
        by_id = {r[0]: r for r in rows}
        out = []
        for cid, score in scored:
            r = by_id.get(cid)
            if r is None:
                continue  # removed since it was scored
            out.append(
                Hit(cid, score, r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]) if r[5] else None, r[6], r[7])
            )
        return out

    # --- re-indexing ------------------------------------------------------------------

    def chunk_texts(self) -> Iterator[tuple[int, str]]:
        yield from self._execute("SELECT id, text FROM chunks ORDER BY id").fetchall()

    def replace_vectors(self, name: str, dimension: int, ids: list[int], vectors: np.ndarray) -> None:
        """Store every chunk's vector from a new model at once, with the model's name."""
        with self.transaction():
            total = self._execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
            if total != len(ids):
                raise StoreError("the store changed while it was being re-indexed; run reindex again")
            self._drop_vector_index()
            self._executemany(
                "UPDATE chunks SET vector = ? WHERE id = ?",
                [(self._vector_param(vectors[i]), cid) for i, cid in enumerate(ids)],
            )
            self._set_meta("model", name)
            self._set_meta("dimension", str(dimension))
            self._on_model(dimension)
            self._bump()


class SQLiteStore(Store):
    """One SQLite file (WAL); exact dense search in NumPy."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = self.location = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Created private before SQLite opens it: SQLite gives the -wal and -shm files the
        # database file's mode, and an empty file is an empty database.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA.format(id="INTEGER PRIMARY KEY", vector="BLOB"))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable SQLite store: {exc}") from exc
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None  # (generation, ids, matrix)
        self._init_meta()

    def close(self) -> None:
        self._db.close()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(sql, params)

    def _executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _vector_param(self, vector: np.ndarray) -> bytes:
        return np.ascontiguousarray(vector, dtype="<f4").tobytes()

    def size_bytes(self) -> int:
        return os.path.getsize(self.path)

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        generation = self.generation()
        with self._lock:
            if self._cache is None or self._cache[0] != generation:
                rows = self._db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                dim = (self.model() or ("", 0))[1]
                matrix = (
                    np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
                    if rows
                    else np.empty((0, dim), dtype=np.float32)
                )
                norms = np.linalg.norm(matrix, axis=1, keepdims=True)
                self._cache = (generation, ids, matrix / np.maximum(norms, 1e-12))
            return self._cache[1], self._cache[2]

    def dense(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        ids, matrix = self._vectors()
        if not len(ids):
            return []
        q = np.asarray(query, dtype=np.float32)
        scores = matrix @ (q / max(float(np.linalg.norm(q)), 1e-12))
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(ids[i]), float(scores[i])) for i in top]


class PgStore(Store):
    """PostgreSQL with pgvector, in its own schema; cosine search through an HNSW index."""

    def __init__(self, url: str, schema: str = "rag") -> None:
        super().__init__()
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
            raise StoreError(f"invalid schema name {schema!r}")
        self.schema = schema
        self.location = re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)  # no password in messages
        try:
            self._db = psycopg.connect(url, autocommit=True)
            self._db.execute("CREATE EXTENSION IF NOT EXISTS vector")
            self._db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            self._db.execute(f"SET search_path TO {schema}, public")
            with self._db.transaction():
                self._db.execute(f"SELECT pg_advisory_xact_lock(hashtext('{schema}'))")  # one creator at a time
                for statement in SCHEMA.format(id="BIGSERIAL PRIMARY KEY", vector="vector").split(";"):
                    if statement.strip():
                        self._db.execute(statement)
        except psycopg.Error as exc:
            raise StoreError(f"cannot use the PostgreSQL store at {self.location}: {exc}".strip()) from exc
        self._init_meta()

    def close(self) -> None:
        self._db.close()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(sql.replace("?", "%s"), params)

    def _executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        with self._db.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock, self._db.transaction():
            self._db.execute("LOCK TABLE meta IN EXCLUSIVE MODE")  # writers one at a time, like SQLite
            yield

    def _vector_param(self, vector: np.ndarray) -> str:
        return "[" + ",".join(f"{x:.9g}" for x in np.asarray(vector, dtype=np.float32)) + "]"

    def _drop_vector_index(self) -> None:
        self._execute("DROP INDEX IF EXISTS chunks_vector")

    def _on_model(self, dimension: int) -> None:
        self._drop_vector_index()
        self._execute(
            f"CREATE INDEX chunks_vector ON chunks USING hnsw ((vector::vector({int(dimension)})) vector_cosine_ops)"
        )

    def size_bytes(self) -> int:
        row = self._execute(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ? AND c.relkind = 'r'",
            (self.schema,),
        ).fetchone()
        return int(row[0])

    def dense(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        model = self.model()
        if model is None:
            return []
        dim = int(model[1])
        rows = self._execute(
            f"SELECT id, 1 - (vector::vector({dim}) <=> ?::vector({dim})) FROM chunks"
            f" ORDER BY vector::vector({dim}) <=> ?::vector({dim}) LIMIT ?",
            (self._vector_param(query), self._vector_param(query), int(k)),
        ).fetchall()
        return [(int(r[0]), float(r[1])) for r in rows]


def open_store(target: str) -> Store:
    """A PostgreSQL store for a ``postgresql://`` URL, else a SQLite file at that path."""
    if target.startswith(("postgresql://", "postgres://")):
        return PgStore(target)
    return SQLiteStore(target)
