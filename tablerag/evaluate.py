"""Retrieval and answer quality on questions with known answers, per retrieval mode and kind.

For each question: where the first passage that answers it ranks (hit@1, recall@k, MRR
over ``MRR_DEPTH``), whether the answer contains the expected value, and whether the
answer was declined ("not found in the documents"); for unanswerable questions, only
whether it was declined. The same figures come from the store directly (``StoreBackend``,
the code ``/search`` and ``/chat`` run) or through a running API server (``ApiBackend``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tablerag.answers import respond
from tablerag.retrieval import MODES, Retriever
from tablerag.samples import QUESTIONS, Question

#: Ranks looked at for MRR.
MRR_DEPTH = 10
#: Passages an answer is built from (``/chat``'s default k).
ANSWER_K = 5
#: The most questions one file may hold.
MAX_QUESTIONS = 10_000


@dataclass(frozen=True, kw_only=True)
class Result:
    document: str
    text: str


class Backend(Protocol):
    def search(self, question: str, k: int, mode: str) -> list[Result]: ...

    def answer(self, question: str, k: int, mode: str) -> tuple[str, bool]: ...


class StoreBackend:
    """Searches and answers in this process, with the code the API routes run."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever

    def search(self, question: str, k: int, mode: str) -> list[Result]:
        hits = self.retriever.search(question, k=k, mode=mode)
        return [Result(document=os.path.basename(h.path), text=h.text) for h in hits]

    def answer(self, question: str, k: int, mode: str) -> tuple[str, bool]:
        reply = respond(question, self.retriever.search(question, k=k, mode=mode))
        return reply.text, reply.declined


class ApiBackend:
    """``POST /search`` and ``POST /chat`` of a running API server (``API_KEY`` from the environment)."""

    def __init__(self, url: str, key: str = "", timeout: float = 60.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            response = self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise RuntimeError(f"{self.client.base_url}{path}: {exc}") from exc
        if response.status_code != 200:
            raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:300]}")
        data: dict[str, Any] = response.json()
        return data

    def search(self, question: str, k: int, mode: str) -> list[Result]:
        found = self._post("/search", {"query": question, "k": k, "mode": mode})["results"]
        return [Result(document=r["document"], text=r["text"]) for r in found]

    def answer(self, question: str, k: int, mode: str) -> tuple[str, bool]:
        reply = self._post("/chat", {"question": question, "k": k, "mode": mode})
        return str(reply["answer"]), bool(reply.get("declined", False))


def load_questions(path: str | None) -> list[Question]:
    if path is None:
        return list(QUESTIONS)
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(items, list) or len(items) > MAX_QUESTIONS:
        raise ValueError(f"{path}: expected a JSON list of at most {MAX_QUESTIONS:,} questions")
    return [
        Question(i["question"], i.get("file", ""), tuple(i.get("contains", ())), i.get("answer", ""), i.get("kind", ""))
        for i in items
    ]


def relevant(result: Result, question: Question) -> bool:
    return result.document == question.file and all(s in result.text for s in question.contains)


def contains_value(answer: str, value: str) -> bool:
    """The value in the answer, not as part of a longer number ('940' is not in '1940')."""
    text, wanted = re.sub(r"\s+", " ", answer), re.sub(r"\s+", " ", value).strip()
    if not wanted:
        return False
    pattern = (r"(?<!\d)(?<!\d[,.])" if wanted[0].isdigit() else "") + re.escape(wanted)
    pattern += r"(?![,.]?\d)" if wanted[-1].isdigit() else ""
    return re.search(pattern, text) is not None


def _figures(rows: list[dict[str, Any]], k: int) -> dict[str, Any]:
    answerable = [r for r in rows if r["answerable"]]
    out: dict[str, Any] = {"n": len(rows)}
    if answerable:
        n = len(answerable)
        out |= {
            "hit@1": round(sum(r["rank"] == 1 for r in answerable) / n, 3),
            f"recall@{k}": round(sum(r["rank"] is not None and r["rank"] <= k for r in answerable) / n, 3),
            "mrr": round(sum(1.0 / r["rank"] for r in answerable if r["rank"]) / n, 3),
            "answer": round(sum(r["correct"] for r in answerable) / n, 3),
            "declined": round(sum(r["declined"] for r in answerable) / n, 3),
        }
    unanswerable = [r for r in rows if not r["answerable"]]
    if unanswerable:
        out["no_answer"] = round(sum(r["declined"] for r in unanswerable) / len(unanswerable), 3)
    return out


def evaluate(
    backend: Backend | Retriever, questions: list[Question], k: int = 5, modes: Iterable[str] = MODES
) -> dict[str, Any]:
    """Figures over all questions and by kind, for each mode; the questions each mode got wrong."""
    if isinstance(backend, Retriever):
        backend = StoreBackend(backend)
    results: dict[str, Any] = {"questions": len(questions), "k": k, "modes": {}}
    for mode in modes:
        rows = []
        for q in questions:
            answerable = bool(q.file)
            rank = None
            if answerable:
                found = backend.search(q.question, max(k, MRR_DEPTH), mode)
                rank = next((i for i, r in enumerate(found, start=1) if relevant(r, q)), None)
            text, declined = backend.answer(q.question, ANSWER_K, mode)
            correct = answerable and not declined and contains_value(text, q.answer or q.contains[-1])
            rows.append({"q": q, "answerable": answerable, "rank": rank, "correct": correct, "declined": declined})
        kinds = sorted({r["q"].kind for r in rows})
        results["modes"][mode] = {
            "all": _figures(rows, k),
            "by_kind": {kind: _figures([r for r in rows if r["q"].kind == kind], k) for kind in kinds},
            "misses": [
                {"question": r["q"].question, "kind": r["q"].kind, "rank": r["rank"], "answer": r["correct"]}
                for r in rows
                if ((r["rank"] != 1 or not r["correct"]) if r["answerable"] else not r["declined"])
            ],
        }
    return results


def table(results: dict[str, Any]) -> str:
    """The figures as Markdown: one line per mode, then one per kind of each mode."""
    k = results["k"]
    lines = [f"| mode | kind | n | hit@1 | recall@{k} | MRR | answer | declined | no-answer |", "|---" * 9 + "|"]

    def cell(figures: dict[str, Any], key: str) -> str:
        return f"{figures[key]:.2f}" if key in figures else ""

    for mode, data in results["modes"].items():
        for kind, figures in [("all", data["all"]), *data["by_kind"].items()]:
            keys = ("hit@1", f"recall@{k}", "mrr", "answer", "declined", "no_answer")
            cells = " | ".join(cell(figures, key) for key in keys)
            lines.append(f"| {mode} | {kind} | {figures['n']} | {cells} |")
    return "\n".join(lines)
