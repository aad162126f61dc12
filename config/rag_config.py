"""Configuration of the document processor: its store and log level (``RagConfig``) and what one
document may cost to ingest (``IngestLimits``; the fixed caps are in ``tablerag.limits``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from config.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class RagConfig:
    """``rag_with_tables.py``'s store and log level (RAG_DB, RAG_LOG_LEVEL)."""

    db: str = "data/rag.sqlite3"
    log_level: str = "warning"

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> RagConfig:
        from config.settings import read  # pydantic: only when read, not in every parser child

        return cls(**read("rag", env))


@dataclass(frozen=True, kw_only=True)
class IngestLimits:
    """The caps a user may need to raise (RAG_MAX_MEMORY_MB and friends)."""

    max_memory_mb: int = 1024
    file_timeout: float = 60.0
    max_table_cells: int = 200_000
    max_document_chars: int = 10_000_000

    def __post_init__(self) -> None:
        for name, minimum in (("max_memory_mb", 16), ("max_table_cells", 1), ("max_document_chars", 1)):
            if getattr(self, name) < minimum:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; allowed values: >= {minimum}")
        if not self.file_timeout > 0:
            raise ConfigError(f"file_timeout={self.file_timeout!r} is invalid; allowed values: seconds > 0")

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> IngestLimits:
        """The limits from ``RAG_MAX_MEMORY_MB`` and friends; ``ConfigError`` names a bad one."""
        from config.settings import read

        return cls(**read("ingest", env))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
