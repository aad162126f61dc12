"""Blocks into chunks: Korean sentences packed to a token budget, one chunk per table row.

Every chunk is embedded and indexed with its document's context: a first line naming the
document (its file name, title and the short lines under the title, where organisations,
years and versions are written), then where in it (section path, sheet, table caption),
then the content. A table row becomes a chunk that stands alone: that context, then
``header: value`` for every cell, so "한빛체육센터 2024년 수영 이용료" finds the row of the
right document among look-alikes. A table that fits the budget is also a chunk of its own as
Markdown. Text is split into sentences with kiwipiepy and packed up to the budget with one
sentence of overlap. Boilerplate paragraphs (source lines, footers) stay chunks of their
own, marked ``furniture`` in their location for retrieval to demote.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tablerag.documents import Block, Table

#: How chunks are made; a store whose chunks were made otherwise is re-chunked on ingest.
#: 1: rows with their caption; 2: every chunk with its document's context.
CHUNKER_VERSION = "2"
#: Tokens per text chunk when the model allows more; shorter chunks retrieve more precisely.
DEFAULT_BUDGET = 256
#: No token of a real vocabulary is longer: a long word is cut looking this many characters
#: ahead per token of room, never further.
CHARS_PER_TOKEN = 16
#: Characters of the document line every chunk starts with.
MAX_CONTEXT_CHARS = 160
#: Short paragraphs under a document's title taken into its context (organisation, date, version).
HEAD_PARAGRAPHS = 3
HEAD_PARAGRAPH_CHARS = 60
#: A paragraph pointing at the table below it ("요금은 다음과 같습니다").
_POINTER = re.compile(r"(?:다음|아래)[^.]{0,15}(?:같다|같습니다|같음)")
#: Morpheme tags kept for BM25: nouns, numbers, roots, verbs and adjectives, foreign words.
BM25_TAGS = ("NN", "NR", "NP", "SN", "SL", "SH", "XR", "VV", "VA", "MAG")

_kiwi_lock = threading.Lock()
_RUNS = re.compile(r"[가-힣]+|[a-z]+|\d+(?:[.,:]\d+)*")
_YEAR = re.compile(r"(?<!\d)(?:19|20)\d\d(?!\d)")


@dataclass
class Chunk:
    kind: str  # "text" | "row" | "table"
    text: str
    location: dict[str, Any] = field(default_factory=dict)
    table: int | None = None  # index of the table in the document
    row: dict[str, str] | None = None  # header -> value, for a row chunk


@functools.cache
def kiwi() -> Any:
    from kiwipiepy import Kiwi

    return Kiwi()


def _tokenize(text: str) -> list[Any]:
    """Kiwi's morphemes of ``text`` (one analyser shared by every thread, used one at a time)."""
    with _kiwi_lock:
        return kiwi().tokenize(text)


def split_sentences(text: str) -> list[str]:
    with _kiwi_lock:
        return [s.text.strip() for s in kiwi().split_into_sents(text) if s.text.strip()]


def terms(text: str) -> list[str]:
    """Terms for BM25: content morphemes and numbers, lower-cased, plus the character bigrams
    of longer nouns, since the analyser splits compounds differently in context
    ("서울특별시" in a table row, "서울 특별시" in a question)."""
    out: list[str] = []
    for token in _tokenize(text):
        if token.tag.startswith(BM25_TAGS):
            form = token.form.lower()
            out.append(form)
            if token.tag.startswith("NN") and len(form) >= 3:
                out += [form[i : i + 2] for i in range(len(form) - 1)]
    return out


def nouns(text: str) -> list[str]:
    """The nouns of ``text`` (common and proper, two syllables or more) and its Latin words."""
    return [t.form for t in _tokenize(text) if t.tag in ("NNG", "NNP", "SL") and len(t.form) >= 2]


def grams(text: str) -> set[str]:
    """Character bigrams of the Hangul runs of ``text`` (a lone syllable as itself), and whole
    Latin words and numbers."""
    out: set[str] = set()
    for run in _RUNS.findall(text.lower()):
        if "가" <= run[0] <= "힣" and len(run) > 1:
            out.update(run[i : i + 2] for i in range(len(run) - 1))
        else:
            out.add(run)
    return out


#: Names of places and organisations end so ("시립남부병원", "다온시", "북구"); a question naming
#: one that a passage does not name is not answered by it.
_NAME = re.compile(
    r"[가-힣]{1,12}(?:병원|의원|센터|도서관|대학교|재단|진흥원|공단|공사|협회|위원회|청)"
    r"|[가-힣]{1,3}(?:시|구|군|동)"
)
_PLACE = re.compile(r"[가-힣]{1,3}(?:시|구|군|동)")
_PARTICLES = re.compile(r"(?:에서|에게|으로|부터|까지|에선|에는|이나|로|은|는|이|가|을|를|의|에|도|와|과|엔|랑)$")


def names(text: str) -> set[str]:
    """Words of ``text`` that name a place or an organisation, without their particles."""
    out: set[str] = set()
    for word in re.findall(r"[가-힣]+", text):
        for form in (word, _PARTICLES.sub("", word)):
            if len(form) >= 2 and _NAME.fullmatch(form) and not _common_noun(form):
                out.add(form)
                break
    return out


def _common_noun(form: str) -> bool:
    """Whether a word shaped like a place ("...구", "...시", "...동") is a common noun the
    dictionary knows instead: "인구", "총인구", "가구", "당시", "활동" (not "남구", "가온시")."""
    if not _PLACE.fullmatch(form):
        return False
    last = _tokenize(form)[-1]
    return last.tag == "NNG" and not last.oov and len(last.form) >= 2 and form.endswith(last.form)


def _initial(syllable: str) -> int:
    return (ord(syllable) - 0xAC00) // 588 if "가" <= syllable <= "힣" else -1


def _slip(name: str, text: str) -> bool:
    """``name`` differs from ``text`` in one syllable, with the same initial consonant (and, in a
    word of two syllables, the same vowel: "순영" for "수영", not "약학" for "의학")."""
    pairs = [(a, b) for a, b in zip(name, text, strict=True) if a != b]
    if len(pairs) != 1 or not _initial(pairs[0][0]) == _initial(pairs[0][1]) >= 0:
        return False
    a, b = (ord(c) - 0xAC00 for c in pairs[0])
    return len(name) > 2 or (a % 588) // 28 == (b % 588) // 28


def names_in(wanted: set[str], text: str) -> bool:
    """Whether ``text`` names each of ``wanted``, allowing one mistyped syllable that keeps its
    initial consonant ("가온행복도서관" for "가온행보도서관"), not another name ("시립남부병원")."""
    words = set(re.findall(r"[가-힣]+", text))
    for name in wanted:
        n = len(name)
        if name not in text and not any(
            _slip(name, word[i : i + n]) for word in words for i in range(len(word) - n + 1)
        ):
            return False
    return True


def years(text: str) -> set[str]:
    return set(_YEAR.findall(text))


class TokenCounter:
    """Counts tokens with the model's own tokenizer (``tokenizer.json``), or estimates them."""

    def __init__(self, model_path: str | None) -> None:
        self._tokenizer: Any = None
        path = os.path.join(model_path, "tokenizer.json") if model_path else ""
        if path and os.path.isfile(path):
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(path)
            self._tokenizer.no_truncation()
            self._tokenizer.no_padding()
        self.exact = self._tokenizer is not None

    def __call__(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text).ids)
        return 2 + len(text.encode("utf-8")) // 3


def location_label(location: dict[str, Any]) -> str:
    parts = []
    if "sheet" in location:
        parts.append(f"시트 {location['sheet']}")
    if "page" in location:
        parts.append(f"{location['page']}쪽")
    if location.get("section"):
        parts.append(str(location["section"]))
    return ", ".join(parts)


def document_context(blocks: list[Block], name: str = "") -> str:
    """One line naming the document: its file name (without suffix), its top heading and the
    short paragraphs that open it, each once, cut to ``MAX_CONTEXT_CHARS``."""
    parts: list[str] = []

    def add(text: str) -> None:
        text = " ".join(text.split())
        if text and not any(text in p for p in parts):
            parts[:] = [p for p in parts if p not in text] + [text]

    first = next((b.location for b in blocks if b.location.get("section")), {})
    add(str(first.get("path", first.get("section", ""))).split(" > ")[0])
    taken = 0
    for block in blocks:
        if block.kind != "text" or len(block.text) > HEAD_PARAGRAPH_CHARS or taken == HEAD_PARAGRAPHS:
            break
        if re.search(r"(?:다|요|니다)\s*[.!?]\s*$", block.text):
            break  # a sentence: the body has begun
        add(block.text)
        taken += 1
    stem = os.path.splitext(os.path.basename(name))[0].replace("_", " ")
    known = grams(" ".join(parts))
    if stem and len(grams(stem) - known) > len(grams(stem)) / 3:  # the file name says more than the title
        parts.insert(0, stem)
    return " | ".join(parts)[:MAX_CONTEXT_CHARS]


def place(location: dict[str, Any], caption: str = "") -> str:
    """Where a chunk is inside its document: section path, sheet, caption."""
    parts: list[str] = []
    known = str(location.get("document", ""))
    path = [p for p in str(location.get("path") or location.get("section") or "").split(" > ") if p not in known]
    for part in (" > ".join(path), location.get("sheet"), caption):
        if part and str(part) not in known and not any(str(part) in p for p in parts):
            parts.append(str(part))
    return " | ".join(parts)


def _head(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines if line)


def row_text(table: Table, row: list[str], location: dict[str, Any]) -> str:
    pairs = ", ".join(f"{h}: {v}" for h, v in zip(table.header, row, strict=False) if v)
    return _head(str(location.get("document", "")), place(location, table.caption)) + pairs


def table_text(table: Table, location: dict[str, Any] | None = None) -> str:
    where = location or {}
    return _head(str(where.get("document", "")), place(where, table.caption)) + table.markdown()


def chunk_blocks(
    blocks: list[Block], count: Callable[[str], int], budget: int = DEFAULT_BUDGET, name: str = ""
) -> list[Chunk]:
    """Chunks in document order; tables are numbered in the order they appear. ``name`` is the
    file's name, part of the document's context."""
    chunks: list[Chunk] = []
    pending: list[Block] = []
    tables = 0
    context = document_context(blocks, name)

    def flush() -> None:
        if pending:
            chunks.extend(_pack_text(pending, count, budget))
            pending.clear()

    for i, original in enumerate(blocks):
        block = Block(original.kind, original.text, original.table, dict(original.location))
        if context:
            block.location["document"] = context
        if i + 1 < len(blocks) and blocks[i + 1].kind == "table" and _POINTER.search(block.text):
            block.location["furniture"] = 1  # "... 다음과 같다": says where the answer is, not what
        if block.kind == "table" and block.table is not None:
            flush()
            table = block.table
            whole = table_text(table, block.location)
            if count(whole) <= budget:
                chunks.append(Chunk("table", whole, dict(block.location), table=tables))
            for row in table.rows:
                cells = {h: v for h, v in zip(table.header, row, strict=False) if v}
                chunks.append(Chunk("row", row_text(table, row, block.location), dict(block.location), tables, cells))
            tables += 1
        else:
            if pending and pending[-1].location != block.location:
                flush()
            pending.append(block)
    flush()
    return chunks


def _pack_text(blocks: list[Block], count: Callable[[str], int], budget: int) -> list[Chunk]:
    location = dict(blocks[0].location)
    prefix = _head(str(location.get("document", "")), place(location))
    room = max(16, budget - count(prefix))
    sentences: list[str] = []
    for block in blocks:
        for sentence in split_sentences(block.text) or [block.text]:
            sentences += _fit(sentence, count, room)
    chunks: list[Chunk] = []
    current: list[str] = []
    for sentence in sentences:
        if current and count(prefix + " ".join([*current, sentence])) > budget:
            chunks.append(Chunk("text", prefix + " ".join(current), dict(location)))
            last = current[-1]  # one sentence of overlap, when it is short and fits
            current = [last] if count(last) <= room // 4 and count(f"{prefix}{last} {sentence}") <= budget else []
        current.append(sentence)
    if current:
        chunks.append(Chunk("text", prefix + " ".join(current), dict(location)))
    return chunks


def _fit(sentence: str, count: Callable[[str], int], room: int) -> list[str]:
    """A sentence longer than the budget, cut at spaces (or anywhere) into pieces that fit.

    Words are packed greedily, as many as fit; the end of each piece is found by galloping
    over the word count (counts grow with words), so a sentence costs a few counts a piece
    instead of one a word. A word longer than the room is cut by characters (``_cut``)."""
    if count(sentence) <= room:
        return [sentence]
    pieces: list[str] = []
    run: list[str] = []  # words that each fit alone
    for word in sentence.split(" "):
        if len(word) > room * CHARS_PER_TOKEN or count(word) > room:  # one long word: cut it by characters
            pieces += _pack(run, count, room)
            cuts, word = _cut(word, count, room)
            pieces += cuts
            run = []
        run.append(word)
    return pieces + _pack(run, count, room)


def _pack(words: list[str], count: Callable[[str], int], room: int) -> list[str]:
    """Words joined by spaces into pieces of at most ``room`` tokens, each as long as fits."""
    pieces: list[str] = []
    i = 0
    while i < len(words):
        while i < len(words) - 1 and not words[i]:
            i += 1  # a piece never starts with an empty word
        fits, step, over = i + 1, 1, len(words) + 1  # words[i:fits] fit; words[i:over] do not
        while fits + step < over and count(" ".join(words[i : fits + step])) <= room:
            fits += step
            step *= 2
        over = min(over, fits + step)
        while over - fits > 1:
            middle = (fits + over) // 2
            if count(" ".join(words[i:middle])) <= room:
                fits = middle
            else:
                over = middle
        if words[i] or fits - i > 1:
            pieces.append(" ".join(words[i:fits]))
        i = fits
    return pieces


def _cut(word: str, count: Callable[[str], int], room: int) -> tuple[list[str], str]:
    """Pieces of a word that fit the room, and the rest that does. Each piece is the first of
    ever halved prefixes that fits, halving from at most twice the last piece (at first from
    ``room * CHARS_PER_TOKEN`` characters): a word of any length is cut in linear time."""
    pieces: list[str] = []
    start, limit = 0, room * CHARS_PER_TOKEN
    while len(word) - start > limit or count(word[start:]) > room:
        cut = min(len(word) - start, limit)
        while cut > 1 and count(word[start : start + cut]) > room:
            cut //= 2
        pieces.append(word[start : start + cut])
        start += cut
        limit = max(2 * cut, 2)
    return pieces, word[start:]


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
