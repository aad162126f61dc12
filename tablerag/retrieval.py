"""Dense, BM25 and hybrid retrieval over a store, with a reranking stage that reads the question.

Each mode finds candidates (dense: cosine; BM25: Korean morphemes; hybrid: reciprocal rank
fusion of both). The candidates are then reranked on what the question names, against each
chunk's text, which carries its document's context (title, organisation, year or version,
sheet, section, caption; ``tablerag.chunking``):

- coverage: the share of the question's character bigrams (IDF-weighted over the store, so
  names weigh and question words do not) found in the chunk; bigrams survive typos and the
  different ways the analyser splits compounds;
- years: a chunk whose context names other years than the question's is demoted, one that
  names the question's year promoted;
- boilerplate (source lines, footers, page numbers: ``furniture`` in the location) is demoted.

Each hit's ``evidence`` is its coverage, or 0 when it lacks a year or a name of a place or
organisation (``chunking.names``) that the question asks about, or when it is a row that
the question names nothing of (a question on "치과" is not answered by the row of "내과"); ``tablerag.answers``
declines to answer below ``answers.MIN_EVIDENCE``. A cross-encoder
would read paraphrases better than bigram coverage, but needs a host serving two models.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from tablerag.chunking import grams, names, names_in, terms, years
from tablerag.store import Hit, Store

Mode = Literal["hybrid", "dense", "bm25"]
MODES: tuple[str, ...] = get_args(Mode)
#: Reciprocal rank fusion constant (Cormack et al., 2009).
RRF_K = 60
#: Candidates each mode finds for the reranking stage (at least; 4 x k when more are asked).
CANDIDATES = 40
#: Weights of the reranking stage: the mode's own rank, coverage, years, boilerplate.
W_RANK = 1.0
W_COVERAGE = 0.3
W_YEAR = 0.4
W_FURNITURE = 0.6


def prompt_for(model: Any, kind: str) -> dict[str, str]:
    """``prompt_name`` for queries or passages when the model defines one (e5: 'query: ')."""
    prompts = model.describe().get("prompts") or {}
    return {"prompt_name": kind} if kind in prompts else {}


@dataclass
class _Index:
    generation: int
    bm25: Any
    ids: list[int]
    idf: dict[str, float]  # bigram -> inverse document frequency over the store's chunks


class Retriever:
    def __init__(self, store: Store, model: Any) -> None:
        self.store = store
        self.model = model
        self._query_prompt = prompt_for(model, "query")
        self._lock = threading.Lock()
        self._index: _Index | None = None

    def check_model(self) -> None:
        """Refuse a store that holds another model's vectors (the model may change between calls)."""
        info = self.model.describe()
        self.store.check_model(str(info["model"]), int(info["dimension"]))

    def embed_query(self, query: str) -> np.ndarray:
        return np.asarray(self.model.encode(query, normalize_embeddings=True, **self._query_prompt))

    def dense(self, query: str, k: int) -> list[tuple[int, float]]:
        return self.store.dense(self.embed_query(query), k)

    def index(self) -> _Index:
        """The BM25 index and bigram statistics of the store, rebuilt when it changed."""
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
        generation = self.store.generation()
        with self._lock:
            if self._index is None or self._index.generation != generation:
                ids, corpus = self.store.all_terms()
                index = None
                if ids:
                    index = bm25s.BM25()
                    index.index([c or ["∅"] for c in corpus], show_progress=False)
                df: Counter[str] = Counter()
                total = 0
                for _, text in self.store.chunk_texts():
                    df.update(grams(text))
                    total += 1
                idf = {g: math.log((total + 1) / (n + 0.5)) for g, n in df.items()}
                self._index = _Index(generation, index, ids, idf)
            return self._index

    def bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        index = self.index()
        words = terms(query)
        if index.bm25 is None or not words:
            return []
        found = index.bm25.retrieve([words], k=min(k, len(index.ids)), show_progress=False)
        ids = index.ids
        return [(ids[int(d)], float(s)) for d, s in zip(found.documents[0], found.scores[0], strict=True) if s > 0]

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not query.strip():
            raise ValueError("the query is empty")
        depth = max(4 * k, CANDIDATES)
        rankings = []
        if mode in ("dense", "hybrid"):
            rankings.append(self.dense(query, depth))
        if mode in ("bm25", "hybrid"):
            rankings.append(self.bm25(query, depth))
        fused: dict[int, float] = {}
        for ranking in rankings:
            for rank, (cid, _) in enumerate(ranking):
                fused[cid] = fused.get(cid, 0.0) + (RRF_K + 1) / (RRF_K + rank + 1) / len(rankings)
        candidates = self.store.hits(sorted(fused.items(), key=lambda item: -item[1])[:depth])
        return self.rerank(query, candidates)[:k]

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        """The candidates in the order of the reranking stage, each with its score and evidence."""
        idf = self.index().idf
        wanted = {g: idf[g] for g in grams(query) if g in idf}
        weight = sum(wanted.values()) or 1.0
        asked, called = years(query), names(query)
        for hit in hits:
            found = grams(hit.text)
            coverage = sum(w for g, w in wanted.items() if g in found) / weight
            named = years(hit.text)
            year = 0.0
            if asked:
                year = 1.0 if asked <= named else (-1.0 if named else -0.5)
            # No evidence without the year or the name the question asks about, nor from a row
            # the question does not point at (by its label or one of its cells).
            rows = [hit.row] if hit.row else _rows(hit.table_markdown) if hit.kind == "table" else []
            pointed = not rows or any(_points_at(query, row) for row in rows)
            hit.evidence = coverage if asked <= named and names_in(called, hit.text) and pointed else 0.0
            hit.score = (
                W_RANK * hit.score + W_COVERAGE * coverage + W_YEAR * year - W_FURNITURE * ("furniture" in hit.location)
            )
        return sorted(hits, key=lambda h: -h.score)


def _points_at(query: str, row: dict[str, str]) -> bool:
    """Whether the question names something of the row: a bigram or number of one of its cells,
    or a word of its label with one mistyped syllable ("순영" for "수영")."""
    cells = list(row.values())
    if grams(query) & grams(" ".join(cells)):
        return True
    return any(names_in({word}, query) for word in re.findall(r"[가-힣]{2,}", cells[0] if cells else ""))


def _rows(markdown: str | None) -> list[dict[str, str]]:
    """The body rows of a table's Markdown, as header -> value."""
    lines = [line.strip().strip("|") for line in (markdown or "").splitlines() if line.startswith("|")]
    if len(lines) < 3:
        return []
    header = [c.strip() for c in lines[0].split("|")]
    return [dict(zip(header, (c.strip() for c in line.split("|")), strict=False)) for line in lines[2:]]
