"""Dense, BM25 and hybrid (reciprocal rank fusion) retrieval over a store."""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal, get_args

import numpy as np

from tablerag.chunking import terms
from tablerag.store import Hit, Store

Mode = Literal["hybrid", "dense", "bm25"]
MODES: tuple[str, ...] = get_args(Mode)
#: Reciprocal rank fusion constant (Cormack et al., 2009).
RRF_K = 60


def prompt_for(model: Any, kind: str) -> dict[str, str]:
    """``prompt_name`` for queries or passages when the model defines one (e5: 'query: ')."""
    prompts = model.describe().get("prompts") or {}
    return {"prompt_name": kind} if kind in prompts else {}


class Retriever:
    def __init__(self, store: Store, model: Any) -> None:
        self.store = store
        self.model = model
        self._query_prompt = prompt_for(model, "query")
        self._lock = threading.Lock()
        self._bm25: tuple[int, Any, list[int]] | None = None  # (generation, index, chunk ids)

    def check_model(self) -> None:
        """Refuse a store that holds another model's vectors (the model may change between calls)."""
        info = self.model.describe()
        self.store.check_model(str(info["model"]), int(info["dimension"]))

    def embed_query(self, query: str) -> np.ndarray:
        return np.asarray(self.model.encode(query, normalize_embeddings=True, **self._query_prompt))

    def dense(self, query: str, k: int) -> list[tuple[int, float]]:
        return self.store.dense(self.embed_query(query), k)

    def bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
        generation = self.store.generation()
        with self._lock:
            if self._bm25 is None or self._bm25[0] != generation:
                ids, corpus = self.store.all_terms()
                index = None
                if ids:
                    index = bm25s.BM25()
                    index.index([c or ["∅"] for c in corpus], show_progress=False)
                self._bm25 = (generation, index, ids)
            _, index, ids = self._bm25
        words = terms(query)
        if index is None or not words:
            return []
        found = index.retrieve([words], k=min(k, len(ids)), show_progress=False)
        return [(ids[int(d)], float(s)) for d, s in zip(found.documents[0], found.scores[0], strict=True) if s > 0]

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not query.strip():
            raise ValueError("the query is empty")
        if mode == "dense":
            return self.store.hits(self.dense(query, k))
        if mode == "bm25":
            return self.store.hits(self.bm25(query, k))
        depth = max(4 * k, 20)
        fused: dict[int, float] = {}
        for ranking in (self.dense(query, depth), self.bm25(query, depth)):
            for rank, (cid, _) in enumerate(ranking):
                fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(fused.items(), key=lambda item: -item[1])[:k]
        return self.store.hits(best)
