"""The chat page: ``GET /``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

ROOT = Path(__file__).resolve().parents[2]

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def page() -> str:
    return (ROOT / "static" / "chat.html").read_text(encoding="utf-8")
