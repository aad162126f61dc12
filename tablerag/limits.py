"""What one document may cost to ingest: structural caps and the box around each parse.

Two layers. The parsers check structural caps before they allocate (cells per table, cells
a span or merged range covers, unzipped bytes of DOCX/XLSX members, objects and content
bytes per PDF page, HTML nesting depth, characters per document), so that a hostile file
fails fast with one line naming the cap. Behind them, ``tablerag.sandbox`` parses each
file in a child process under an address-space limit and a CPU/wall-clock limit, for
whatever the caps do not foresee.

The caps a user may need to raise are settings (``IngestLimits``, declared with every other
variable in ``config.settings`` and read by ``load()``); the others are constants far above
any real document.
"""

from __future__ import annotations

from config.rag_config import IngestLimits

#: A cell spans at most this many rows or columns (HTML's own maximum for colspan).
MAX_SPAN = 1000
#: Columns of one table (Excel allows 16,384; a table of row chunks needs far fewer).
MAX_TABLE_COLUMNS = 1000
#: Elements nested deeper than this in HTML: each level's text repeats every deeper level's.
MAX_NESTING_DEPTH = 200
#: Uncompressed bytes of the XML parts of a DOCX/XLSX (the parsers build trees of them).
MAX_UNZIPPED_XML_BYTES = 128 << 20
#: Uncompressed bytes of all parts of a DOCX/XLSX (images included).
MAX_UNZIPPED_BYTES = 512 << 20
#: Expansion ratio of one zip member larger than ``ZIP_RATIO_FLOOR``: real XML stays far below.
MAX_ZIP_RATIO = 200
ZIP_RATIO_FLOOR = 4 << 20
#: Decoded bytes of one PDF page's content streams.
MAX_PAGE_CONTENT_BYTES = 32 << 20
#: Characters, lines, curves and images on one PDF page (a dense page of text has ~5,000).
MAX_PAGE_OBJECTS = 100_000


__all__ = [
    "MAX_NESTING_DEPTH",
    "MAX_PAGE_CONTENT_BYTES",
    "MAX_PAGE_OBJECTS",
    "MAX_SPAN",
    "MAX_TABLE_COLUMNS",
    "MAX_UNZIPPED_BYTES",
    "MAX_UNZIPPED_XML_BYTES",
    "MAX_ZIP_RATIO",
    "ZIP_RATIO_FLOOR",
    "IngestLimits",
]
