"""Answers and citations for ``/chat`` and ``/search``: the sources of the best hits (a row hit with
the rows of its table around it, all within a byte budget), an answer extracted from them, or
one streamed by an OpenAI-compatible chat endpoint grounded in them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shm_model import errors
from tablerag.chunking import location_label, split_sentences, terms
from tablerag.store import Hit

#: A row hit carries its table's Markdown up to this size (else the rows around the hit).
MAX_TABLE_BYTES = 8 << 10
#: The sources of one /search and one /chat response, all together.
MAX_RESPONSE_BYTES = 1 << 20
NOT_FOUND = "관련 문서를 찾지 못했습니다. (No matching passages in the documents.)"


@dataclass(frozen=True, kw_only=True)
class ChatEndpoint:
    """An OpenAI-compatible chat completions endpoint (``CHAT_API_BASE``, ``CHAT_MODEL``, ``CHAT_API_KEY``)."""

    base: str
    model: str
    key: str = ""
    timeout: float = 60.0


def _cells(line: str) -> list[str]:
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def _matches(line: str, wanted: list[str]) -> bool:
    cells = _cells(line)
    return all(v in cells for v in wanted)


def bounded_table(markdown: str, row: dict[str, str] | None, limit: int = MAX_TABLE_BYTES) -> tuple[str | None, bool]:
    """A table's Markdown up to ``limit`` UTF-8 bytes: whole when it fits, else its header and
    the rows around ``row`` (None when the row is not found). Returns it and whether it was cut."""
    if len(markdown.encode()) <= limit:
        return markdown, False
    lines = markdown.split("\n")
    head, body = lines[:2], lines[2:]
    wanted = [str(v) for v in (row or {}).values() if v]
    hit = next(
        (i for i, line in enumerate(body) if wanted and all(v in line for v in wanted) and _matches(line, wanted)), None
    )
    size = sum(len(line.encode()) + 1 for line in head)
    if hit is None or size + len(body[hit].encode()) > limit:
        return None, True
    low = high = hit
    size += len(body[hit].encode()) + 1
    grew = True
    while grew:  # one row below, then one above, while they fit
        grew = False
        for i in (high + 1, low - 1):
            if 0 <= i < len(body) and size + len(body[i].encode()) + 1 <= limit:
                size += len(body[i].encode()) + 1
                low, high = min(low, i), max(high, i)
                grew = True
    return "\n".join(head + body[low : high + 1]), True


def citation(n: int, hit: Hit) -> dict[str, Any]:
    table, cut = None, False
    if hit.kind in ("row", "table") and hit.table_markdown:
        table, cut = bounded_table(hit.table_markdown, hit.row)
    return {
        "n": n,
        "document": os.path.basename(hit.path),
        "location": location_label(hit.location),
        "kind": hit.kind,
        "score": round(hit.score, 4),
        "text": hit.text,
        "row": hit.row,
        "table": table,
        "table_truncated": cut,
        "caption": hit.table_caption,
    }


def citations(hits: list[Hit], budget: int = MAX_RESPONSE_BYTES) -> tuple[list[dict[str, Any]], bool]:
    """The citations of ``hits`` while they fit in ``budget`` bytes (as JSON); whether some were left out."""
    out: list[dict[str, Any]] = []
    for n, hit in enumerate(hits, start=1):
        item = citation(n, hit)
        size = len(json.dumps(item, ensure_ascii=False).encode())
        if size > budget:
            return out, True
        budget -= size
        out.append(item)
    return out, False


def extractive_answer(question: str, hits: list[Hit]) -> str:
    """The best passage, and the next ones only when they match the question as well: table
    rows as they are, and from text the sentence sharing most terms with the question."""
    wanted = set(terms(question))
    parts: list[str] = []
    best_overlap = len(wanted & set(terms(hits[0].text))) if hits else 0
    for n, hit in enumerate(hits[:3], start=1):
        if n > 1 and len(wanted & set(terms(hit.text))) < best_overlap:
            continue  # only as good a match as the best one
        if hit.row:
            parts.append(", ".join(f"{h}: {v}" for h, v in hit.row.items()) + f" [{n}]")
        elif hit.kind == "table":
            lines = [line for line in hit.text.splitlines() if line.startswith("|") and "---" not in line]
            best = max(lines[1:] or lines, key=lambda line: len(wanted & set(terms(line))))
            parts.append(f"{lines[0]}\n{best} [{n}]" if lines[1:] else f"{best} [{n}]")
        else:
            body = hit.text.split("\n", 1)[-1]
            sentences = split_sentences(body) or [body]
            best = max(sentences, key=lambda s: len(wanted & set(terms(s))))
            parts.append(f"{best} [{n}]")
    return "\n".join(parts)


def context_block(hits: list[Hit]) -> str:
    blocks = []
    for n, hit in enumerate(hits, start=1):
        where = location_label(hit.location)
        table = bounded_table(hit.table_markdown, hit.row)[0] if hit.row and hit.table_markdown else None
        body = hit.text + ("\n" + table if table else "")
        blocks.append(f"[{n}] {os.path.basename(hit.path)}{' (' + where + ')' if where else ''}\n{body}")
    return "\n\n".join(blocks)[:MAX_RESPONSE_BYTES]


def llm_answer(chat: ChatEndpoint, question: str, hits: list[Hit]) -> Iterator[str]:
    """Stream the answer of an OpenAI-compatible chat endpoint, grounded in the passages."""
    import httpx

    messages = [
        {
            "role": "system",
            "content": "Answer in the language of the question, only from the numbered sources, and cite them "
            "like [1]. If the sources do not contain the answer, say so.",
        },
        {"role": "user", "content": f"Sources:\n{context_block(hits)}\n\nQuestion: {question}"},
    ]
    body = {"model": chat.model, "messages": messages, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {chat.key}"} if chat.key else {}
    url = chat.base.rstrip("/") + "/chat/completions"
    received = 0
    with httpx.stream("POST", url, json=body, headers=headers, timeout=chat.timeout) as response:
        if response.status_code != 200:
            raise errors.HostUnavailable(f"the chat model at {chat.base} answered {response.status_code}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            delta = json.loads(data)["choices"][0].get("delta", {}).get("content")
            if delta:
                received += len(delta)
                if received > MAX_RESPONSE_BYTES:
                    break  # an answer is not a megabyte long
                yield delta


@dataclass(frozen=True)
class Reply:
    text: str
    declined: bool


def respond(question: str, hits: list[Hit]) -> Reply:
    if not hits:
        return Reply(NOT_FOUND, True)
    return Reply(extractive_answer(question, hits), False)
