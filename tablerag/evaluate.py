"""Retrieval quality on questions with known answers: recall@k and MRR per retrieval mode."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tablerag.retrieval import MODES, Retriever
from tablerag.samples import QUESTIONS, Question
from tablerag.store import Hit

#: Ranks looked at for MRR.
MRR_DEPTH = 10


def load_questions(path: str | None) -> list[Question]:
    if path is None:
        return list(QUESTIONS)
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    return [Question(i["question"], i["file"], tuple(i["contains"])) for i in items]


def relevant(hit: Hit, question: Question) -> bool:
    return os.path.basename(hit.path) == question.file and all(s in hit.text for s in question.contains)


def evaluate(retriever: Retriever, questions: list[Question], k: int = 5) -> dict[str, Any]:
    results: dict[str, Any] = {"questions": len(questions), "k": k, "modes": {}}
    for mode in MODES:
        found = 0
        reciprocal = 0.0
        misses = []
        for q in questions:
            hits = retriever.search(q.question, k=max(k, MRR_DEPTH), mode=mode)
            rank = next((i for i, hit in enumerate(hits, start=1) if relevant(hit, q)), None)
            if rank is not None and rank <= k:
                found += 1
            else:
                misses.append(q.question)
            if rank is not None:
                reciprocal += 1.0 / rank
        results["modes"][mode] = {
            f"recall@{k}": round(found / len(questions), 3),
            "mrr": round(reciprocal / len(questions), 3),
            "misses": misses,
        }
    return results
