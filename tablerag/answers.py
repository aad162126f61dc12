"""Answers and citations for ``/chat`` and ``/search``: the sources of the best hits (a row hit with
the rows of its table around it, all within a byte budget), an answer extracted from them, or
one streamed by an OpenAI-compatible chat endpoint grounded in them."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shm_model import errors
from tablerag.chunking import grams, location_label, names_in, nouns, split_sentences
from tablerag.store import Hit

#: A row hit carries its table's Markdown up to this size (else the rows around the hit).
MAX_TABLE_BYTES = 8 << 10
#: The sources of one /search and one /chat response, all together.
MAX_RESPONSE_BYTES = 1 << 20


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


#: A hit whose evidence (``Hit.evidence``: the share of the question's distinctive words it
#: holds, halved when it lacks a year the question names) is below this is no answer: the
#: reply says the documents do not say. Calibrated on the evaluation collection (README).
MIN_EVIDENCE = 0.5
NOT_FOUND = "문서에서 답을 찾지 못했습니다. (Not found in the documents.)"

#: What a question asks for, and how the column or value that answers it looks:
#: (question pattern, header pattern, value pattern).
CUES: list[tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]] = [
    (re.compile(p), re.compile(h), re.compile(v))
    for p, h, v in (
        (r"얼마|금액|요금|비용|가격|이용료|수수료|회비|내야|들어", r"원|료|금|비|액", r"\d\s*원|^\d{1,3}(,\d{3})+$"),
        (r"몇\s*명|인원|인구|사람", r"명|인원|인구|정원|현원", r"^\d[\d,]*$"),
        (r"언제|몇\s*시|시간|요일", r"시간|일시|기간|요일|일자|날짜", r"\d{1,2}:\d{2}|요일|휴진|\d+\s*(?:월|일|시)"),
        (r"몇\s*권", r"권", r"권|^\d[\d,]*$"),
        (r"몇\s*석|좌석", r"석", r"석|^\d[\d,]*$"),
        (r"몇\s*세대|세대|가구", r"세대|가구", r"^\d[\d,]*$"),
        (r"전화|연락처|번호", r"전화|연락처|번호", r"\d{2,4}-\d{3,4}-\d{4}"),
        (r"몇\s*%|비율|률|율", r"률|율|%", r"%"),
        (r"어디|위치|주소|소재", r"소재|위치|주소|장소", r"[가-힣]+(동|구|시|군|읍|면|로|길)$"),
    )
]
_UNIT = re.compile(r"\(([^()]*)\)")
#: Nouns that ask rather than name.
_QUESTION_WORD = re.compile(r"얼마|며칠|무엇|언제|어디|누구|몇")


@dataclass(frozen=True)
class Reply:
    """An answer extracted from the hits (or ``NOT_FOUND``), whether it was declined, and the
    hits it rests on, one per source (a table once, however many of its rows were hits)."""

    text: str
    declined: bool
    hits: list[Hit]


def dedupe(hits: list[Hit]) -> list[Hit]:
    """The hits with each table, and each passage, once (the best-ranked hit of it)."""
    seen: set[tuple[str, str]] = set()
    out: list[Hit] = []
    for hit in hits:
        key = (hit.path, hit.table_markdown if hit.kind in ("row", "table") and hit.table_markdown else body(hit))
        if key not in seen:
            seen.add(key)
            out.append(hit)
    return out


def body(hit: Hit) -> str:
    """A chunk's content without its context lines (document, place)."""
    return hit.text.rsplit("\n", 1)[-1] if hit.kind == "text" else hit.text


def respond(question: str, hits: list[Hit]) -> Reply:
    """The reply to ``question`` from ranked ``hits``: declined when the best one's evidence is
    below ``MIN_EVIDENCE`` or it does not hold what the question asks about (``asks_of``); else
    the value it holds (a row's cell, a table's row, a passage's sentence), cited."""
    unique = dedupe(hits)
    if not unique or unique[0].evidence < MIN_EVIDENCE or not asks_of(question, unique[0]):
        return Reply(NOT_FOUND, True, unique)
    return Reply(extractive_answer(question, unique), False, unique)


def extractive_answer(question: str, hits: list[Hit]) -> str:
    """From the best hit: for a row (or the best row of a table), the cell whose column the
    question asks for, with its unit, row label and column, then the whole row; for text, the
    sentence that answers."""
    hit = hits[0]
    row = hit.row
    if row is None and hit.kind == "table":
        row = _best_row(question, hit.text)
    if row:
        return _cell_answer(question, row, hit) + " [1]\n" + ", ".join(f"{h}: {v}" for h, v in row.items())
    sentences = split_sentences(body(hit)) or [body(hit)]
    # Words every sentence shares, or the chunk's context lines hold, do not tell sentences apart.
    shared = grams(hit.text[: len(hit.text) - len(body(hit))])
    counts = Counter(g for s in sentences for g in grams(s))
    shared |= {g for g, n in counts.items() if len(sentences) > 2 and n > len(sentences) / 2}
    wanted = grams(question) - shared
    return max(sentences, key=lambda s: _sentence_score(question, wanted, s)) + " [1]"


def _holds(word: str, text: str) -> bool:
    """Whether ``text`` holds ``word``: a bigram of it, or the word with one mistyped syllable."""
    return bool(grams(word) & grams(text)) or names_in({word}, text)


def asks_of(question: str, hit: Hit) -> bool:
    """Whether ``hit`` holds what the question asks about, beyond what names its document or row.

    A passage must hold in its body (not only in its context lines: document, place) one of
    the question's nouns that its context lines do not. A row with several values must have a
    column the question names (by a word of its header, or by the kind of value: ``CUES``),
    unless the question names nothing the row and its table do not hold: "수영 강사의 이름" is
    not answered by the fee or the hours of the row of "수영". Question words ("얼마", "며칠")
    are not what is asked about."""
    wanted = [word for word in nouns(question) if not _QUESTION_WORD.fullmatch(word)]
    if hit.kind == "text":
        text = body(hit)
        context = hit.text[: len(hit.text) - len(text)]
        asked = [word for word in wanted if not grams(word) & grams(context)]
        return not asked or any(_holds(word, text) for word in asked)
    row = hit.row if hit.row is not None or hit.kind != "table" else _best_row(question, hit.text)
    if not row or len(row) < 3:
        return True
    if any(_header_score(question, header, value) > 0 for header, value in list(row.items())[1:]):
        return True
    held = hit.text + "\n" + (hit.table_markdown or "")
    return all(_holds(word, held) for word in wanted)


def _overlap(question: str, text: str) -> float:
    wanted = grams(question)
    return len(wanted & grams(text)) / max(1, len(wanted))


def _cue_score(question: str, header: str, value: str) -> float:
    score = 0.0
    for ask, column, shape in CUES:
        if ask.search(question):
            score += 0.5 * bool(column.search(header)) + 0.5 * bool(shape.search(value))
    return score


def _header_score(question: str, header: str, value: str) -> float:
    found = grams(header) & grams(question)
    # A one-syllable part of a header ("여" of "인구(명) 여") matches a word starting with it ("여자").
    single = [run for run in re.findall(r"[가-힣]+", header) if len(run) == 1]
    starts = sum(1 for run in single if re.search(rf"(?<![가-힣]){run}", question))
    return len(found) + starts + _cue_score(question, header, value)


def _cell_answer(question: str, row: dict[str, str], hit: Hit) -> str:
    items = list(row.items())
    label_header, label = items[0]
    cells = items[1:] or items
    header, value = max(cells, key=lambda item: _header_score(question, item[0], item[1]))
    units = _UNIT.findall(header) or re.findall(r"단위\s*[:：]\s*([^)]+)", hit.table_caption or "")
    unit = f" ({units[0].strip()})" if units and not value.endswith(units[0].strip()) else ""
    where = f"{label}, {header}" if (label_header, label) != (header, value) else header
    return f"{value}{unit} — {where}"


def _best_row(question: str, markdown: str) -> dict[str, str] | None:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    if len(lines) < 3:
        return None
    header = _cells(lines[0])
    rows = [_cells(line) for line in lines[2:]]
    best = max(rows, key=lambda cells: _overlap(question, " ".join(cells)))
    return {h: v for h, v in zip(header, best, strict=False) if v}


def _sentence_score(question: str, wanted: set[str], sentence: str) -> float:
    return len(wanted & grams(sentence)) + sum(
        1 for ask, _, shape in CUES if ask.search(question) and shape.search(sentence)
    )


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
