"""Document parsers: paragraphs and tables in document order, each with where it was found.

Every parser returns a list of ``Block``s. A table keeps its header (multi-row headers
flattened per column, e.g. ``인구(만 명) 2022년``), its body rows and a caption (the
table's caption or the nearest heading). ``ParseError`` carries one clear line per file.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import statistics
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ParseError(Exception):
    """A file that cannot be read: corrupt, encrypted, empty or of an unsupported type."""


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(cell(h) for h in self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Block:
    kind: str  # "text" | "table"
    text: str = ""
    table: Table | None = None
    location: dict[str, Any] = field(default_factory=dict)  # page, sheet, section


SUPPORTED = (".pdf", ".docx", ".html", ".htm", ".md", ".markdown", ".csv", ".xlsx", ".txt")


def parse(path: Path) -> list[Block]:
    """Parse one file; raise ``ParseError`` with a one-line reason when it cannot be read."""
    suffix = path.suffix.lower()
    parser = PARSERS.get(suffix)
    if parser is None:
        raise ParseError(f"unsupported file type {suffix or '(none)'!r}; supported: {', '.join(SUPPORTED)}")
    if path.stat().st_size == 0:
        raise ParseError("empty file")
    try:
        blocks = parser(path)
    except ParseError:
        raise
    except Exception as exc:  # every library has its own errors for broken files
        raise ParseError(f"cannot read {suffix[1:].upper()} file: {type(exc).__name__}: {exc}".strip()) from exc
    blocks = [b for b in blocks if (b.kind == "text" and b.text.strip()) or (b.table and b.table.rows)]
    if not blocks:
        raise ParseError("no text or tables found")
    return blocks


# --- shared helpers --------------------------------------------------------------------


def clean(text: Any) -> str:
    return re.sub(r"\s+", " ", "" if text is None else str(text)).strip()


def flatten_header(header_rows: list[list[str]]) -> list[str]:
    """Join multi-row headers per column, dropping repeats from spanning cells."""
    width = max((len(r) for r in header_rows), default=0)
    names = []
    for col in range(width):
        parts: list[str] = []
        for row in header_rows:
            value = row[col] if col < len(row) else ""
            if value and (not parts or parts[-1] != value):
                parts.append(value)
        names.append(" ".join(parts) or f"열{col + 1}")
    return names


def table_from_grid(grid: list[list[str]], header_rows: int, caption: str) -> Table | None:
    grid = [row for row in grid if any(cell for cell in row)]
    if not grid:
        return None
    width = max(len(r) for r in grid)
    grid = [r + [""] * (width - len(r)) for r in grid]
    header_rows = max(1, min(header_rows, len(grid) - 1)) if len(grid) > 1 else 1
    return Table(flatten_header(grid[:header_rows]), grid[header_rows:], caption)


def decode_text(data: bytes) -> str:
    for encoding in ("utf-8-sig", "cp949"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise ParseError("text is neither UTF-8 nor CP949")


def paragraphs(text: str, location: dict[str, Any]) -> Iterable[Block]:
    for para in re.split(r"\n\s*\n", text):
        if para.strip():
            yield Block("text", clean(para), location=dict(location))


# --- plain text, Markdown, CSV ---------------------------------------------------------


def parse_txt(path: Path) -> list[Block]:
    return list(paragraphs(decode_text(path.read_bytes()), {}))


_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")


def _md_cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [clean(c.replace("\\|", "|")) for c in re.split(r"(?<!\\)\|", line)]


def parse_markdown(path: Path) -> list[Block]:
    lines = decode_text(path.read_bytes()).splitlines()
    blocks: list[Block] = []
    section = ""
    para: list[str] = []

    def flush() -> None:
        if para:
            blocks.append(Block("text", clean(" ".join(para)), location={"section": section} if section else {}))
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        heading = _MD_HEADING.match(line)
        if heading:
            flush()
            section = clean(heading.group(2))
        elif "|" in line and i + 1 < len(lines) and _MD_SEPARATOR.match(lines[i + 1]):
            flush()
            grid = [_md_cells(line)]
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                grid.append(_md_cells(lines[i]))
                i += 1
            caption = para_caption(blocks, section)
            table = table_from_grid(grid, 1, caption)
            if table:
                blocks.append(Block("table", table=table, location={"section": section} if section else {}))
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return blocks


def para_caption(blocks: list[Block], section: str) -> str:
    """A table's caption: the short paragraph right before it (e.g. '표 1. ...'), else the heading."""
    if blocks and blocks[-1].kind == "text" and len(blocks[-1].text) <= 80:
        return blocks[-1].text
    return section


def parse_csv(path: Path) -> list[Block]:
    text = decode_text(path.read_bytes())
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel  # type: ignore[assignment]
    grid = [[clean(c) for c in row] for row in csv.reader(io.StringIO(text), dialect)]
    table = table_from_grid(grid, 1, path.stem.replace("_", " "))
    return [Block("table", table=table)] if table else []


# --- HTML ------------------------------------------------------------------------------


def parse_html(path: Path) -> list[Block]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(decode_text(path.read_bytes()), "html.parser")
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    root = soup.body or soup
    blocks: list[Block] = []
    section = ""
    for element in root.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "table", "pre", "blockquote"]):
        if element.find_parent("table") is not None:
            continue  # text inside a table belongs to the table
        if element.name == "table":
            caption_tag = element.find("caption")
            caption = clean(caption_tag.get_text(" ")) if caption_tag else para_caption(blocks, section)
            table = _html_table(element, caption)
            if table:
                blocks.append(Block("table", table=table, location={"section": section} if section else {}))
        elif element.name.startswith("h"):
            section = clean(element.get_text(" "))
        elif element.name == "li" and element.find_parent(["li"]) is not None:
            continue
        else:
            text = clean(element.get_text(" "))
            if text:
                blocks.append(Block("text", text, location={"section": section} if section else {}))
    return blocks


def _html_table(table: Any, caption: str) -> Table | None:
    """Expand rowspan/colspan into a grid; header rows are <thead> rows or rows of only <th>."""
    grid: list[list[str]] = []
    pending: dict[tuple[int, int], str] = {}  # (row, col) -> text from a rowspan above
    header_rows = 0
    rows = [tr for tr in table.find_all("tr") if tr.find_parent("table") is table]
    for r, tr in enumerate(rows):
        cells = tr.find_all(["td", "th"], recursive=False)
        row: list[str] = []
        col = 0
        for cell in cells:
            while (r, col) in pending:
                row.append(pending.pop((r, col)))
                col += 1
            text = clean(cell.get_text(" "))
            colspan = _span(cell.get("colspan"))
            rowspan = _span(cell.get("rowspan"))
            for c in range(colspan):
                row.append(text)
                for dr in range(1, rowspan):
                    pending[(r + dr, col + c)] = text
            col += colspan
        while (r, col) in pending:
            row.append(pending.pop((r, col)))
            col += 1
        grid.append(row)
        in_head = tr.find_parent("thead") is not None
        if header_rows == r and (in_head or (cells and all(c.name == "th" for c in cells))):
            header_rows += 1
    return table_from_grid(grid, header_rows or 1, caption)


def _span(value: Any) -> int:
    try:
        return max(1, min(int(str(value)), 1000))
    except (TypeError, ValueError):
        return 1


# --- DOCX ------------------------------------------------------------------------------


def parse_docx(path: Path) -> list[Block]:
    import docx
    from docx.table import Table as DocxTable
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(str(path))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        if _is_encrypted_office(path):
            raise ParseError("the document is encrypted (password-protected)") from exc
        raise
    blocks: list[Block] = []
    section = ""
    for child in document.element.body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            para = Paragraph(child, document)
            text = clean(para.text)
            style = (para.style.name if para.style is not None else "") or ""
            if not text:
                continue
            if style.lower().startswith(("heading", "title")):
                section = text
            else:
                blocks.append(Block("text", text, location={"section": section} if section else {}))
        elif tag == "tbl":
            grid, header_rows = _docx_grid(DocxTable(child, document))
            table = table_from_grid(grid, header_rows, para_caption(blocks, section))
            if table:
                blocks.append(Block("table", table=table, location={"section": section} if section else {}))
    return blocks


def _docx_grid(table: Any) -> tuple[list[list[str]], int]:
    grid = [[clean(cell.text) for cell in row.cells] for row in table.rows]
    header_rows = 0
    for row in table.rows:
        tr_pr = row._tr.trPr
        if tr_pr is not None and any(el.tag.endswith("}tblHeader") for el in tr_pr.iterchildren()):
            header_rows += 1
        else:
            break
    return grid, header_rows or 1


def _is_encrypted_office(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # an OLE container: encrypted OOXML


# --- XLSX ------------------------------------------------------------------------------


def parse_xlsx(path: Path) -> list[Block]:
    import openpyxl

    try:
        workbook = openpyxl.load_workbook(str(path), data_only=True)
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        if _is_encrypted_office(path):
            raise ParseError("the workbook is encrypted (password-protected)") from exc
        raise
    blocks: list[Block] = []
    for sheet in workbook.worksheets:
        merged = {}
        for rng in sheet.merged_cells.ranges:
            value = sheet.cell(rng.min_row, rng.min_col).value
            for r in range(rng.min_row, rng.max_row + 1):
                for c in range(rng.min_col, rng.max_col + 1):
                    merged[(r, c)] = value
        rows: list[tuple[int, list[str]]] = []
        for r, row in enumerate(sheet.iter_rows(), start=1):
            values = [_xlsx_value(merged.get((r, cell.column), cell.value)) for cell in row]
            if any(values):
                rows.append((r, values))
        if not rows:
            continue
        caption = ""
        if len(rows) > 1 and len({c for c in rows[0][1] if c}) == 1 and len({c for c in rows[1][1] if c}) > 1:
            caption = next(c for c in rows[0][1] if c)  # a title row above the header
            rows = rows[1:]
        # Two header rows when the first one has a cell merged across columns (a group name).
        first = rows[0][0]
        grouped = any(rng.min_row == first and rng.max_col > rng.min_col for rng in sheet.merged_cells.ranges)
        header_rows = 2 if grouped and len(rows) > 2 else 1
        grid = [values for _, values in rows]
        table = table_from_grid(grid, header_rows, caption or sheet.title)
        if table:
            blocks.append(Block("table", table=table, location={"sheet": sheet.title}))
    return blocks


def _xlsx_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return clean(value)


# --- PDF -------------------------------------------------------------------------------


def parse_pdf(path: Path) -> list[Block]:
    import pdfplumber
    from pdfminer.pdfdocument import PDFPasswordIncorrect

    try:
        pdf = pdfplumber.open(str(path))
    except PDFPasswordIncorrect as exc:
        raise ParseError("the PDF is encrypted (password-protected)") from exc
    except Exception as exc:  # pdfplumber wraps pdfminer's errors
        if any(isinstance(e, PDFPasswordIncorrect) for e in (*exc.args, exc.__cause__, exc.__context__)):
            raise ParseError("the PDF is encrypted (password-protected)") from exc
        raise
    blocks: list[Block] = []
    section = ""
    with pdf:
        for number, page in enumerate(pdf.pages, start=1):
            items: list[tuple[float, Block]] = []
            found = page.find_tables()
            boxes = [t.bbox for t in found]
            for t in found:
                grid = [[clean(c) for c in row] for row in t.extract()]
                table = table_from_grid(grid, 1, "")
                if table:
                    items.append((t.bbox[1], Block("table", table=table, location={"page": number})))
            words = [
                w
                for w in page.extract_words(keep_blank_chars=False, use_text_flow=True)
                if not any(_inside(w, box) for box in boxes)
            ]
            for top, block in _pdf_text_and_stream_tables(words, number):
                items.append((top, block))
            items.sort(key=lambda item: item[0])
            for _, block in items:
                if block.kind == "table" and block.table is not None:
                    block.table.caption = para_caption(blocks, section)
                elif _looks_like_heading(block.text):
                    section = block.text
                    continue
                if section:
                    block.location["section"] = section
                blocks.append(block)
    return blocks


def _inside(word: dict[str, Any], box: tuple[float, float, float, float]) -> bool:
    x0, top, x1, bottom = box
    return word["x0"] >= x0 - 1 and word["x1"] <= x1 + 1 and word["top"] >= top - 1 and word["bottom"] <= bottom + 1


def _looks_like_heading(text: str) -> bool:
    return len(text) <= 40 and bool(re.match(r"^(제\s*\d+\s*[장절조]|\d+(\.\d+)*\.?\s|[IVX]+\.\s)", text))


def _pdf_lines(words: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    lines: list[list[dict[str, Any]]] = []
    for word in sorted(words, key=lambda w: (round(w["top"]), w["x0"])):
        if lines and abs(lines[-1][0]["top"] - word["top"]) <= 2:
            lines[-1].append(word)
        else:
            lines.append([word])
    return [sorted(line, key=lambda w: w["x0"]) for line in lines]


def _line_cells(line: list[dict[str, Any]], gap: float) -> list[tuple[float, str]]:
    """Words of a line joined into cells wherever the horizontal gap is wider than ``gap``."""
    cells: list[tuple[float, str]] = []
    start, text, right = line[0]["x0"], line[0]["text"], line[0]["x1"]
    for word in line[1:]:
        if word["x0"] - right > gap:
            cells.append((start, text))
            start, text = word["x0"], word["text"]
        else:
            text += " " + word["text"]
        right = word["x1"]
    cells.append((start, text))
    return cells


def _pdf_text_and_stream_tables(words: list[dict[str, Any]], page: int) -> list[tuple[float, Block]]:
    """Text lines into paragraphs; runs of 3+ lines with the same 2+ aligned cells into a table.

    pdfplumber's default strategy needs ruling lines; this is the stream-mode fallback for
    tables laid out with whitespace only.
    """
    lines = _pdf_lines(words)
    if not lines:
        return []
    heights = [w["bottom"] - w["top"] for w in words]
    size = statistics.median(heights) if heights else 10.0
    cells = [_line_cells(line, gap=size * 1.5) for line in lines]
    out: list[tuple[float, Block]] = []
    i = 0
    para: list[str] = []
    para_top = 0.0
    last_bottom = None

    def flush() -> None:
        if para:
            out.append((para_top, Block("text", clean(" ".join(para)), location={"page": page})))
            para.clear()

    while i < len(lines):
        run = _aligned_run(cells, i, tolerance=size * 1.5)
        if run >= 3:
            flush()
            grid = [[text for _, text in cells[j]] for j in range(i, i + run)]
            table = table_from_grid(grid, 1, "")
            if table:
                out.append((lines[i][0]["top"], Block("table", table=table, location={"page": page})))
            i += run
            last_bottom = None
            continue
        line = lines[i]
        text = " ".join(w["text"] for w in line)
        top = line[0]["top"]
        new_para = last_bottom is not None and top - last_bottom > size * 0.9
        if new_para or _looks_like_heading(text):
            flush()
        if not para:
            para_top = top
        para.append(text)
        if _looks_like_heading(text):
            flush()
        last_bottom = max(w["bottom"] for w in line)
        i += 1
    flush()
    return out


def _aligned_run(cells: list[list[tuple[float, str]]], start: int, tolerance: float) -> int:
    """How many lines from ``start`` have the same number (>= 2) of cells starting at the same x."""
    first = cells[start]
    if len(first) < 2:
        return 0
    run = 1
    for line in cells[start + 1 :]:
        if len(line) != len(first) or any(abs(a[0] - b[0]) > tolerance * 4 for a, b in zip(line, first, strict=True)):
            break
        run += 1
    return run


PARSERS: dict[str, Callable[[Path], list[Block]]] = {
    ".pdf": parse_pdf,
    ".docx": parse_docx,
    ".html": parse_html,
    ".htm": parse_html,
    ".md": parse_markdown,
    ".markdown": parse_markdown,
    ".csv": parse_csv,
    ".xlsx": parse_xlsx,
    ".txt": parse_txt,
}
