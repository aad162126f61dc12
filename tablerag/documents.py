"""Document parsers: paragraphs and tables in document order, each with where it was found.

Every parser returns a list of ``Block``s. A table keeps its header (multi-row headers
flattened per column, e.g. ``인구(만 명) 2022년``), its body rows and a caption (the
table's caption or the nearest heading). ``ParseError`` carries one clear line per file.

Every parser checks the caps of ``tablerag.limits`` before it allocates what a file claims
(``TooLarge`` names the cap): a ``Budget`` per document counts its characters and the
cells of each table; spans, merged ranges, zip members, PDF pages and HTML nesting are
checked where they are read.
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

from tablerag.limits import (
    MAX_NESTING_DEPTH,
    MAX_PAGE_CONTENT_BYTES,
    MAX_PAGE_OBJECTS,
    MAX_SPAN,
    MAX_TABLE_COLUMNS,
    MAX_UNZIPPED_BYTES,
    MAX_UNZIPPED_XML_BYTES,
    MAX_ZIP_RATIO,
    ZIP_RATIO_FLOOR,
    IngestLimits,
)

log = logging.getLogger(__name__)


class ParseError(Exception):
    """A file that cannot be read: corrupt, encrypted, empty or of an unsupported type."""


class TooLarge(ParseError):
    """A file over one of the caps of ``tablerag.limits``; the message names the cap."""


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

    def to_dict(self) -> dict[str, Any]:
        table = None if self.table is None else [self.table.header, self.table.rows, self.table.caption]
        return {"kind": self.kind, "text": self.text, "table": table, "location": self.location}

    @staticmethod
    def from_dict(data: Any) -> Block:
        """A block sent by a parser process; anything not of the expected shape is refused."""

        def strings(value: Any) -> list[str]:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("expected a list of strings")
            return value

        if not isinstance(data, dict) or data.get("kind") not in ("text", "table"):
            raise ValueError("expected a block")
        text, location, raw = data.get("text"), data.get("location"), data.get("table")
        if not isinstance(text, str) or not isinstance(location, dict):
            raise ValueError("expected text and location")
        if not all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in location.items()):
            raise ValueError("expected a location of strings and numbers")
        table = None
        if raw is not None:
            if not isinstance(raw, list) or len(raw) != 3 or not isinstance(raw[2], str):
                raise ValueError("expected [header, rows, caption]")
            if not isinstance(raw[1], list):
                raise ValueError("expected rows")
            table = Table(strings(raw[0]), [strings(row) for row in raw[1]], raw[2])
        return Block(data["kind"], text, table, location)


class Budget:
    """What one document may still take: its characters, and the cells of each table."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self.chars = 0

    def cells(self, count: int, exact: bool = True) -> None:
        """Refuse a table of ``count`` cells (or of at least that many, if not ``exact``) over the cap."""
        limit = self.limits.max_table_cells
        if count > limit:
            size = f"{count:,}" if exact else f"at least {count:,}"
            raise TooLarge(f"table has {size} cells; the limit is {limit:,} (RAG_MAX_TABLE_CELLS)")

    def columns(self, count: int) -> None:
        if count > MAX_TABLE_COLUMNS:
            raise TooLarge(f"table has {count:,} columns; the limit is {MAX_TABLE_COLUMNS:,}")

    def check(self, chars: int) -> None:
        """Refuse a document of ``chars`` characters (or more) over the cap."""
        limit = self.limits.max_document_chars
        if chars > limit:
            raise TooLarge(f"document has more than {limit:,} characters (RAG_MAX_DOCUMENT_CHARS)")

    def take(self, chars: int) -> None:
        self.chars += chars
        self.check(self.chars)

    def blocks(self) -> Blocks:
        return Blocks(self)


class Blocks(list[Block]):
    """A document's blocks; each one appended is charged to the budget first."""

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self.budget = budget

    def append(self, block: Block) -> None:
        if block.table is not None:
            table = block.table
            self.budget.take(sum(len(c) + 1 for row in (table.header, *table.rows) for c in row) + len(table.caption))
        self.budget.take(len(block.text))
        super().append(block)


SUPPORTED = (".pdf", ".docx", ".html", ".htm", ".md", ".markdown", ".csv", ".xlsx", ".txt")


def parse(path: Path, limits: IngestLimits | None = None) -> list[Block]:
    """Parse one file; raise ``ParseError`` with a one-line reason when it cannot be read."""
    budget = Budget(limits or IngestLimits())
    suffix = path.suffix.lower()
    parser = PARSERS.get(suffix)
    if parser is None:
        raise ParseError(f"unsupported file type {suffix or '(none)'!r}; supported: {', '.join(SUPPORTED)}")
    if path.stat().st_size == 0:
        raise ParseError("empty file")
    try:
        blocks = parser(path, budget)
    except (ParseError, MemoryError):
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


#: Page furniture and notes around content: source and contact lines, page numbers, revision
#: stamps, breadcrumbs and copyright lines. Kept, but marked, so that retrieval demotes them.
_BOILERPLATE = re.compile(
    r"^\s*(?:[-=*_]{3,}\s*)?(?:"
    r"[(<\[]?\s*(?:자료|출처|주|문의|비고|작성|담당|※)\s*[)>\]]?\s*[:：]"
    r"|※|[-–—]\s*\d{1,4}\s*[-–—]$|\d{1,4}\s*/\s*\d{1,4}$|page\s+\d+"
    r"|(?:최종\s*)?(?:수정일|개정일|발행일|작성일|등록일)\s*[:：]?\s*\d"
    r"|copyright|©|all rights reserved|.*홈페이지\s*>"
    r")",
    re.IGNORECASE,
)


def is_boilerplate(text: str) -> bool:
    """Footers, source lines, page numbers and the like (a short line that is not content)."""
    return len(text) <= 160 and _BOILERPLATE.match(text) is not None


def table_from_grid(grid: list[list[str]], header_rows: int, caption: str, budget: Budget) -> Table | None:
    grid = [row for row in grid if any(cell for cell in row)]
    while len(grid) > 2 and sum(1 for c in grid[-1] if c) == 1 and is_boilerplate(next(c for c in grid[-1] if c)):
        grid.pop()  # a source line under the table, in its last row
    if not grid:
        return None
    width = max(len(r) for r in grid)
    budget.columns(width)
    budget.cells(width * len(grid))  # before padding every row to the widest
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


def read_text(path: Path, budget: Budget) -> str:
    """A text file's content, refused before decoding when it holds too many characters."""
    data = path.read_bytes()
    budget.check(len(data) // 4)  # UTF-8 and CP949 take at most 4 bytes a character
    text = decode_text(data)
    budget.check(len(text))
    return text


def paragraphs(text: str, location: dict[str, Any]) -> Iterable[Block]:
    for para in re.split(r"\n\s*\n", text):
        if para.strip():
            yield text_block(clean(para), location)


class Outline:
    """The headings above the current point of a document, by level: the nearest one is the
    ``section``, all of them from the top the ``path`` ('규정 > 제2장 대출')."""

    def __init__(self) -> None:
        self.levels: list[tuple[int, str]] = []

    def enter(self, level: int, text: str) -> None:
        self.levels = [(n, t) for n, t in self.levels if n < level] + [(level, text)]

    @property
    def section(self) -> str:
        return self.levels[-1][1] if self.levels else ""

    def location(self) -> dict[str, Any]:
        if not self.levels:
            return {}
        where: dict[str, Any] = {"section": self.section}
        if len(self.levels) > 1:
            where["path"] = " > ".join(t for _, t in self.levels)
        return where


def text_block(text: str, location: dict[str, Any]) -> Block:
    """A paragraph, marked ``furniture`` in its location when it is boilerplate."""
    where = dict(location)
    if is_boilerplate(text):
        where["furniture"] = 1
    return Block("text", text, location=where)


# --- plain text, Markdown, CSV ---------------------------------------------------------


def parse_txt(path: Path, budget: Budget) -> list[Block]:
    blocks = budget.blocks()
    for block in paragraphs(read_text(path, budget), {}):
        blocks.append(block)
    return blocks


#: A heading's text is what follows, less the closing ``#``s; no pattern with two adjacent
#: ``\s*`` (those backtrack cubically on a long run of spaces).
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_MD_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")


def _md_cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [clean(c.replace("\\|", "|")) for c in re.split(r"(?<!\\)\|", line)]


def _md_heading(line: str) -> str | None:
    match = _MD_HEADING.match(line)
    return None if match is None else clean(match.group(2).rstrip().rstrip("#"))


def parse_markdown(path: Path, budget: Budget) -> list[Block]:
    lines = read_text(path, budget).splitlines()
    blocks = budget.blocks()
    outline = Outline()
    para: list[str] = []

    def flush() -> None:
        if para:
            blocks.append(text_block(clean(" ".join(para)), outline.location()))
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        heading = _md_heading(line)
        if heading is not None:
            flush()
            outline.enter(len(line) - len(line.lstrip("#")), heading)
        elif "|" in line and i + 1 < len(lines) and _MD_SEPARATOR.match(lines[i + 1]):
            flush()
            grid = [_md_cells(line)]
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                grid.append(_md_cells(lines[i]))
                i += 1
            caption = para_caption(blocks, outline.section)
            table = table_from_grid(grid, 1, caption, budget)
            if table:
                blocks.append(Block("table", table=table, location=outline.location()))
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return blocks


_CAPTION = re.compile(r"^\s*[<\[(]?\s*(?:표|table|tab\.)\s*[\d.\-]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?:다|요|음|함|임|[:：])\s*[.!?]?\s*$")


def para_caption(blocks: list[Block], section: str) -> str:
    """A table's caption: the paragraph right before it when it reads as one ('표 1. ...', or a
    short title that is not a sentence), else the nearest heading."""
    if blocks and blocks[-1].kind == "text" and "furniture" not in blocks[-1].location:
        text = blocks[-1].text
        if len(text) <= 80 and (_CAPTION.match(text) or (len(text) <= 50 and not _SENTENCE_END.search(text))):
            return text
    return section


def parse_csv(path: Path, budget: Budget) -> list[Block]:
    text = read_text(path, budget)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel  # type: ignore[assignment]
    grid: list[list[str]] = []
    cells = width = filled = 0
    for row in csv.reader(io.StringIO(text), dialect):
        cells += len(row)
        values = [clean(c) for c in row]
        if any(values):
            filled += 1
            width = max(width, len(values))
        budget.columns(width)
        budget.cells(max(cells, width * filled), exact=False)  # width * filled: the grid it pads into
        grid.append(values)
    table = table_from_grid(grid, 1, path.stem.replace("_", " "), budget)
    blocks = budget.blocks()
    if table:
        blocks.append(Block("table", table=table))
    return blocks


# --- HTML ------------------------------------------------------------------------------


def parse_html(path: Path, budget: Budget) -> list[Block]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(decode_text(path.read_bytes()), "html.parser")
    _check_depth(soup)
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    root = soup.body or soup
    blocks = budget.blocks()
    outline = Outline()
    for element in root.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "table", "pre", "blockquote"]):
        if element.find_parent("table") is not None:
            continue  # text inside a table belongs to the table
        if element.name == "table":
            caption_tag = element.find("caption")
            caption = clean(caption_tag.get_text(" ")) if caption_tag else para_caption(blocks, outline.section)
            table = _html_table(element, caption, budget)
            if table:
                blocks.append(Block("table", table=table, location=outline.location()))
        elif element.name.startswith("h"):
            outline.enter(int(element.name[1]), clean(element.get_text(" ")))
        elif element.name == "li" and element.find_parent(["li"]) is not None:
            continue
        else:
            text = clean(element.get_text(" "))
            if text:
                blocks.append(text_block(text, outline.location()))
    return blocks


def _check_depth(soup: Any) -> None:
    """Refuse elements nested deeper than ``MAX_NESTING_DEPTH`` (one pass, no recursion)."""
    depth: dict[int, int] = {id(soup): 0}
    for element in soup.descendants:
        if getattr(element, "name", None) is None:
            continue  # text
        level = depth[id(element.parent)] + 1
        if level > MAX_NESTING_DEPTH:
            raise TooLarge(f"elements are nested more than {MAX_NESTING_DEPTH} deep")
        depth[id(element)] = level


def _html_table(table: Any, caption: str, budget: Budget) -> Table | None:
    """Expand rowspan/colspan into a grid; header rows are <thead> rows or rows of only <th>.

    Every cell a span covers is charged to the table's cells before it is expanded."""
    grid: list[list[str]] = []
    pending: dict[tuple[int, int], str] = {}  # (row, col) -> text from a rowspan above
    header_rows = 0
    covered = 0
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
            covered += colspan * rowspan
            budget.cells(covered, exact=False)
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
    return table_from_grid(grid, header_rows or 1, caption, budget)


def _span(value: Any) -> int:
    try:
        return max(1, min(int(str(value)), MAX_SPAN))
    except (TypeError, ValueError):
        return 1


# --- DOCX ------------------------------------------------------------------------------


def check_zip(path: Path) -> None:
    """Refuse a DOCX/XLSX whose parts would unzip to too much, from the sizes its directory
    declares (``zipfile`` never inflates a member past its declared size)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        return  # the parser says what is wrong with it
    xml = total = 0
    for member in members:
        total += member.file_size
        if member.filename.endswith((".xml", ".rels")):
            xml += member.file_size
        if member.file_size > ZIP_RATIO_FLOOR and member.file_size > MAX_ZIP_RATIO * max(1, member.compress_size):
            raise TooLarge(
                f"{member.filename} unzips {member.file_size / max(1, member.compress_size):,.0f} times larger; "
                f"the limit is {MAX_ZIP_RATIO} (a zip bomb?)"
            )
    if xml > MAX_UNZIPPED_XML_BYTES:
        raise TooLarge(f"its XML unzips to {xml >> 20:,} MB; the limit is {MAX_UNZIPPED_XML_BYTES >> 20:,} MB")
    if total > MAX_UNZIPPED_BYTES:
        raise TooLarge(f"it unzips to {total >> 20:,} MB; the limit is {MAX_UNZIPPED_BYTES >> 20:,} MB")


def parse_docx(path: Path, budget: Budget) -> list[Block]:
    import docx
    from docx.table import Table as DocxTable
    from docx.text.paragraph import Paragraph

    check_zip(path)
    try:
        document = docx.Document(str(path))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        if _is_encrypted_office(path):
            raise ParseError("the document is encrypted (password-protected)") from exc
        raise
    blocks = budget.blocks()
    outline = Outline()
    for child in document.element.body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            para = Paragraph(child, document)
            text = clean(para.text)
            style = (para.style.name if para.style is not None else "") or ""
            if not text:
                continue
            if style.lower().startswith(("heading", "title")):
                level = re.search(r"\d+", style)
                outline.enter(int(level.group()) if level and style.lower().startswith("heading") else 0, text)
            else:
                blocks.append(text_block(text, outline.location()))
        elif tag == "tbl":
            grid, header_rows = _docx_grid(DocxTable(child, document), budget)
            table = table_from_grid(grid, header_rows, para_caption(blocks, outline.section), budget)
            if table:
                blocks.append(Block("table", table=table, location=outline.location()))
    return blocks


def _docx_grid(table: Any, budget: Budget) -> tuple[list[list[str]], int]:
    """The cells of each row as python-docx's ``_Row.cells`` gives them (a cell once per grid
    column it spans; a vertically merged cell's text from the cell that starts the merge),
    with every span charged to the table's cells before it is expanded."""
    from docx.table import _Cell

    grid: list[list[str]] = []
    above: dict[int, tuple[str, int]] = {}  # grid offset -> (text, span) in the row above
    cells = 0
    for row in table.rows:
        tr = row._tr
        offset = tr.grid_before
        values: list[str] = []
        starts: dict[int, tuple[str, int]] = {}
        for tc in tr.tc_lst:
            span = max(0, tc.grid_span)
            if tc.vMerge == "continue" and offset in above:
                text, span = above[offset]
            else:
                text = clean(_Cell(tc, table).text)
            cells += span
            budget.cells(cells, exact=False)
            values += [text] * span
            starts[offset] = (text, span)
            offset += span
        grid.append(values)
        above = starts
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


def parse_xlsx(path: Path, budget: Budget) -> list[Block]:
    """Each sheet streamed once, as openpyxl's read-only mode reads it: its reader loads the
    strings, styles and sheet list, and the sheets are read here (a read-only worksheet would
    first scan its whole sheet for a ``dimension`` element)."""
    from openpyxl.reader.excel import ExcelReader
    from openpyxl.styles.stylesheet import apply_stylesheet

    check_zip(path)
    try:
        reader = ExcelReader(str(path), read_only=True, data_only=True)
        reader.read_manifest()
        reader.read_strings()
        reader.read_workbook()
        apply_stylesheet(reader.archive, reader.wb)
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        if _is_encrypted_office(path):
            raise ParseError("the workbook is encrypted (password-protected)") from exc
        raise
    blocks = budget.blocks()
    with reader.archive:
        for sheet, rel in reader.parser.find_sheets():
            if rel.target not in reader.valid_files or "chartsheet" in rel.Type:
                continue
            with reader.archive.open(rel.target) as source:
                table = _xlsx_table(source, reader, sheet.name, budget)
            if table:
                blocks.append(Block("table", table=table, location={"sheet": sheet.name}))
    return blocks


def _xlsx_table(source: Any, reader: Any, title: str, budget: Budget) -> Table | None:
    """One sheet as a table: its used range taken from the cells and merged ranges it really
    holds (not from the range its ``dimension`` claims), a merged range's value in each of its
    cells, rows without a value left out.

    The sheet's parser is the one openpyxl's read-only rows use; it also yields the merged
    ranges. Cells are charged to the table's budget as they stream in, merged ranges by their
    area before they are expanded.
    """
    from openpyxl.utils import range_boundaries
    from openpyxl.worksheet._reader import WorkSheetParser

    workbook = reader.wb
    rows: dict[int, dict[int, Any]] = {}
    width = cells = 0
    parser = WorkSheetParser(
        source,
        reader.shared_strings,
        data_only=True,
        epoch=workbook.epoch,
        date_formats=workbook._date_formats,
        timedelta_formats=workbook._timedelta_formats,
    )
    for r, row in parser.parse():
        cells += len(row)
        budget.cells(cells, exact=False)
        for cell in row:
            width = max(width, cell["column"])
            if cell["value"] is not None:
                rows.setdefault(r, {})[cell["column"]] = cell["value"]
    merges = [range_boundaries(m.ref) for m in (parser.merged_cells.mergeCell if parser.merged_cells else [])]
    area = 0
    for min_col, min_row, max_col, max_row in merges:
        area += (max_row - min_row + 1) * (max_col - min_col + 1)
        budget.cells(area, exact=False)
        width = max(width, max_col)
    budget.columns(width)
    merged: dict[tuple[int, int], Any] = {}
    for min_col, min_row, max_col, max_row in merges:
        value = rows.get(min_row, {}).get(min_col)
        for r in range(min_row, max_row + 1):
            for c in range(min_col, max_col + 1):
                merged[(r, c)] = value
    filled = sorted(set(rows) | {r for r, _ in merged})
    budget.cells(len(filled) * width)
    found: list[tuple[int, list[str]]] = []
    for r in filled:
        cells_of = rows.get(r, {})
        values = [_xlsx_value(merged.get((r, c), cells_of.get(c))) for c in range(1, width + 1)]
        if any(values):
            found.append((r, values))
    if not found:
        return None
    caption = ""
    if len(found) > 1 and len({c for c in found[0][1] if c}) == 1 and len({c for c in found[1][1] if c}) > 1:
        caption = next(c for c in found[0][1] if c)  # a title row above the header
        found = found[1:]
    # Two header rows when the first one has a cell merged across columns (a group name).
    first = found[0][0]
    grouped = any(min_row == first and max_col > min_col for min_col, min_row, max_col, _ in merges)
    header_rows = 2 if grouped and len(found) > 2 else 1
    return table_from_grid([values for _, values in found], header_rows, caption or title, budget)


def _xlsx_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return clean(value)


# --- PDF -------------------------------------------------------------------------------


def parse_pdf(path: Path, budget: Budget) -> list[Block]:
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
    blocks = budget.blocks()
    section = ""
    last: tuple[Block, list[float]] | None = None  # the previous page's last table, with its column edges
    with pdf:
        for number, page in enumerate(pdf.pages, start=1):
            _bounded_layout(page, number)
            items: list[tuple[float, Block]] = []
            found = page.find_tables()
            boxes = [t.bbox for t in found]
            edges: dict[int, list[float]] = {}
            for t in found:
                grid = [[clean(c) for c in row] for row in t.extract()]
                table = table_from_grid(grid, 1, "", budget)
                if table:
                    block = Block("table", table=table, location={"page": number})
                    edges[id(block)] = [c[0] for c in t.rows[0].cells if c is not None] if t.rows else []
                    items.append((t.bbox[1], block))
            words = [
                w
                for w in page.extract_words(keep_blank_chars=False, use_text_flow=True)
                if not any(_inside(w, box) for box in boxes)
            ]
            for top, block in _pdf_text_and_stream_tables(words, number, budget):
                items.append((top, block))
            items.sort(key=lambda item: item[0])
            content = [block for _, block in items if "furniture" not in block.location]
            if last is not None and content and content[0].table is not None:
                if _continues(last, content[0].table, edges.get(id(content[0]), [])):
                    _append_rows(last[0], content[0].table, budget)
                    items = [item for item in items if item[1] is not content[0]]
            for _, block in items:
                if block.kind == "table" and block.table is not None:
                    block.table.caption = para_caption(blocks, section)
                elif _looks_like_heading(block.text):
                    section = block.text
                    continue
                if section:
                    block.location["section"] = section
                blocks.append(block)
            tail = [block for _, block in items if "furniture" not in block.location]
            last = (tail[-1], edges[id(tail[-1])]) if tail and id(tail[-1]) in edges else None
    return blocks


def _continues(last: tuple[Block, list[float]], table: Table, edges: list[float]) -> bool:
    """Whether a table opening a page continues the table that closed the previous one: as many
    columns, starting at the same places (within 3 points)."""
    previous, previous_edges = last
    if previous.table is None or len(previous.table.header) != len(table.header) or len(edges) != len(previous_edges):
        return False
    return all(abs(a - b) <= 3 for a, b in zip(edges, previous_edges, strict=True))


def _append_rows(block: Block, table: Table, budget: Budget) -> None:
    """The rows of a continuation under the first page's header; its first row is a row, unless it
    repeats the header."""
    assert block.table is not None, "a continued table must be a table; this is a bug"
    rows = table.rows if table.header == block.table.header else [table.header, *table.rows]
    budget.take(sum(len(c) + 1 for row in rows for c in row))
    budget.cells(len(block.table.header) * (len(block.table.rows) + len(rows) + 1))
    block.table.rows.extend(rows)


def _bounded_layout(page: Any, number: int) -> None:
    """Lay the page out as pdfplumber does, refusing it early when its content streams decode
    to more than ``MAX_PAGE_CONTENT_BYTES`` or it draws more than ``MAX_PAGE_OBJECTS``
    characters, lines, curves and images (each one costs about a kilobyte laid out).

    pdfplumber lays a page out once, in ``Page.layout``, and keeps the result in
    ``page._layout``; this fills that with the same device and interpreter, counting."""
    import zlib

    from pdfminer.pdfinterp import PDFPageInterpreter
    from pdfminer.pdftypes import LITERALS_FLATE_DECODE, PDFStream, resolve1
    from pdfplumber.page import PDFPageAggregatorWithMarkedContent

    size = 0
    for stream in page.page_obj.contents:
        stream = resolve1(stream)
        if not isinstance(stream, PDFStream):
            continue
        filters = [f for f, _ in stream.get_filters()]
        try:
            if stream.rawdata is not None and filters and filters[0] in LITERALS_FLATE_DECODE:
                size += len(zlib.decompressobj().decompress(stream.rawdata, MAX_PAGE_CONTENT_BYTES + 1))
            else:
                size += len(stream.get_data())
        except zlib.error:
            size += len(stream.get_data())  # pdfminer keeps what a broken stream decodes to
        if size > MAX_PAGE_CONTENT_BYTES:
            raise TooLarge(f"page {number} has more than {MAX_PAGE_CONTENT_BYTES >> 20} MB of content")

    class Counting(PDFPageAggregatorWithMarkedContent):  # type: ignore[misc]
        objects = 0

        def tag_cur_item(self) -> None:  # called once for every character, path and image
            self.objects += 1
            if self.objects > MAX_PAGE_OBJECTS:
                raise TooLarge(f"page {number} draws more than {MAX_PAGE_OBJECTS:,} objects")
            super().tag_cur_item()

    device = Counting(page.pdf.rsrcmgr, pageno=page.page_number, laparams=page.pdf.laparams)
    PDFPageInterpreter(page.pdf.rsrcmgr, device).process_page(page.page_obj)
    page._layout = device.get_result()


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


def _pdf_text_and_stream_tables(words: list[dict[str, Any]], page: int, budget: Budget) -> list[tuple[float, Block]]:
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
            out.append((para_top, text_block(clean(" ".join(para)), {"page": page})))
            para.clear()

    while i < len(lines):
        run = _aligned_run(cells, i, tolerance=size * 1.5)
        if run >= 3:
            flush()
            grid = [[text for _, text in cells[j]] for j in range(i, i + run)]
            table = table_from_grid(grid, 1, "", budget)
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


PARSERS: dict[str, Callable[[Path, Budget], list[Block]]] = {
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
