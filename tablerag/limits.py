"""What one document may cost to ingest: structural caps and the box around each parse.

Two layers. The parsers check structural caps before they allocate (cells per table, cells
a span or merged range covers, unzipped bytes of DOCX/XLSX members, objects and content
bytes per PDF page, HTML nesting depth, characters per document), so that a hostile file
fails fast with one line naming the cap. Behind them, ``tablerag.sandbox`` parses each
file in a child process under an address-space limit and a CPU/wall-clock limit, for
whatever the caps do not foresee.

The caps a user may need to raise are settings (``IngestLimits``, read from the
environment by ``load()``); the others are constants far above any real document.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from config.model_config import parse_int, parse_seconds

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


#: field -> (environment variable, parser, help)
SETTINGS: dict[str, tuple[str, Callable[[str, str], Any], str]] = {
    "max_memory_mb": (
        "RAG_MAX_MEMORY_MB",
        parse_int(16),
        "MB of address space a parse may add to the parser process",
    ),
    "file_timeout": ("RAG_FILE_TIMEOUT", parse_seconds, "seconds a parse may take"),
    "max_table_cells": ("RAG_MAX_TABLE_CELLS", parse_int(1), "cells a table may have, spans and merged cells included"),
    "max_document_chars": (
        "RAG_MAX_DOCUMENT_CHARS",
        parse_int(1),
        "characters of text and cells a document may have",
    ),
}


@dataclass(frozen=True, kw_only=True)
class IngestLimits:
    max_memory_mb: int = 1024
    file_timeout: float = 60.0
    max_table_cells: int = 200_000
    max_document_chars: int = 10_000_000

    def __post_init__(self) -> None:
        for item in fields(self):
            env, parse, _ = SETTINGS[item.name]
            parse(env, str(getattr(self, item.name)))

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> IngestLimits:
        """The limits from ``RAG_MAX_MEMORY_MB`` and friends; ``ConfigError`` names a bad one."""
        env = os.environ if env is None else env
        values = {name: parse(var, env[var]) for name, (var, parse, _) in SETTINGS.items() if env.get(var)}
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_help() -> str:
    defaults = IngestLimits()
    return "; ".join(f"{var} ({text}; default {getattr(defaults, name)})" for name, (var, _, text) in SETTINGS.items())
