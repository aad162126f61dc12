"""Ingestion: files into the store, one transaction per file, idempotent by content hash.

Each file is parsed in a child process under the memory and time limits of
``IngestLimits`` (``tablerag.sandbox``); a file over a limit fails alone and leaves the
store as it was.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tablerag.chunking import CHUNKER_VERSION, DEFAULT_BUDGET, TokenCounter, chunk_blocks, terms
from tablerag.documents import ParseError
from tablerag.limits import IngestLimits
from tablerag.retrieval import prompt_for
from tablerag.sandbox import ParseBox
from tablerag.store import DocumentInput, Store

log = logging.getLogger(__name__)

ENCODE_BATCH = 64


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    chunks: int = 0
    pages: int = 0
    seconds: float = 0.0
    parse_peak_rss: int = 0  # bytes: the most memory one file's parse took (its process's peak RSS)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and every non-hidden file under folders named, in a stable order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            found.append(path)
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.absolute(), None)
    return list(unique)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Ingestor:
    """Parses, chunks, embeds (through the model manager's encoder) and stores files."""

    def __init__(self, store: Store, model: Any, limits: IngestLimits | None = None) -> None:
        self.store = store
        self.model = model
        self.limits = limits or IngestLimits()
        info = model.describe()
        self.model_name = str(info["model"])
        self.dimension = int(info["dimension"])
        self.count = TokenCounter(info.get("model_path"))
        self.budget = min(DEFAULT_BUDGET, int(info.get("max_seq_length") or DEFAULT_BUDGET)) - 2
        self._passage_prompt = prompt_for(model, "passage")
        self._stale = False

    def check_model(self) -> None:
        self.store.check_model(self.model_name, self.dimension)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        return np.asarray(
            self.model.encode(
                texts, batch_size=ENCODE_BATCH, normalize_embeddings=True, priority="bulk", **self._passage_prompt
            ),
            dtype=np.float32,
        )

    def ingest(
        self,
        paths: Iterable[str | Path],
        progress: bool = False,
        on_file: Callable[[dict[str, Any]], None] | None = None,
    ) -> IngestReport:
        """Ingest files and folders; ``on_file`` hears of each file as it is done."""
        self.check_model()
        files = discover(paths)
        report = IngestReport()
        # Chunks made by an older chunker are made again, even from unchanged files.
        if self.store.setting("chunker") != CHUNKER_VERSION and not self.store.documents():
            self.store.set_setting("chunker", CHUNKER_VERSION)  # a new store
        self._stale = self.store.setting("chunker") != CHUNKER_VERSION
        started = time.perf_counter()
        bar = tqdm(total=len(files), unit="file", desc="ingest", disable=not progress)
        with ParseBox(self.limits) as box, bar:
            for path in files:
                bar.set_postfix_str(path.name[-40:])
                event = self._one(path, report, box)
                if on_file is not None:
                    on_file({"event": "file", "path": str(path), **event})
                bar.update(1)
            report.parse_peak_rss = box.peak_rss
        report.seconds = time.perf_counter() - started
        if not report.failed and self.store.setting("chunker") != CHUNKER_VERSION:
            if self._stale:
                log.warning("chunks of files not named in this run keep the old chunker's form: ingest them again")
            self.store.set_setting("chunker", CHUNKER_VERSION)
        return report

    def _one(self, path: Path, report: IngestReport, box: ParseBox) -> dict[str, Any]:
        key = str(path)
        try:
            if not path.exists():
                raise ParseError("no such file")
            digest = sha256(path)
            previous = self.store.document_hash(key)
            if previous == digest and not self._stale:
                report.unchanged.append(key)
                return {"status": "unchanged", "chunks": 0}
            blocks = box.parse(path)
        except (ParseError, OSError) as exc:
            report.failed.append((key, str(exc)))
            log.info("%s: %s", path, exc)
            return {"status": "failed", "error": str(exc)}
        chunks = chunk_blocks(blocks, self.count, self.budget, name=path.name)
        vectors = self.embed([c.text for c in chunks])
        tables = [(b.table, b.location) for b in blocks if b.kind == "table" and b.table is not None]
        doc = DocumentInput(key, digest, path.stat().st_size, tables, chunks, [terms(c.text) for c in chunks], vectors)
        self.store.replace_document(doc, time.time())
        (report.replaced if previous else report.added).append(key)
        report.chunks += len(chunks)
        report.pages += len({str(b.location.get("page", b.location.get("sheet", ""))) for b in blocks})
        log.info("%s: %d chunks (%d tables)", path, len(chunks), len(tables))
        return {"status": "replaced" if previous else "added", "chunks": len(chunks)}

    def reindex(self, progress: bool = False) -> int:
        """Re-embed every chunk with the current model and adopt it for the store."""
        ids, texts = [], []
        for cid, text in self.store.chunk_texts():
            ids.append(cid)
            texts.append(text)
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        with tqdm(total=len(texts), unit="chunk", desc="reindex", disable=not progress) as bar:
            for start in range(0, len(texts), 256):
                batch = texts[start : start + 256]
                vectors[start : start + len(batch)] = self.embed(batch)
                bar.update(len(batch))
        self.store.replace_vectors(self.model_name, self.dimension, ids, vectors)
        return len(ids)
