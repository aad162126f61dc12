"""Packages depend one way: read from the sources (ast), so that no import, even a lazy one
inside a function, breaks the layering.

``FORBIDDEN`` maps a package or module (a folder or a ``.py`` file of the repository) to the
top-level names it must never import; add a row to state a new rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, base_env

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "config": ("shm_model", "api_server", "tablerag", "workers", "rag_with_tables", "fastapi", "torch"),
    "shm_model/cli.py": ("api_server", "fastapi", "uvicorn", "tablerag"),
    "shm_model/errors.py": ("shm_model", "api_server", "tablerag", "workers"),
}


def sources(target: str) -> list[Path]:
    path = ROOT / target
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def imported(path: Path, package: str | None = None) -> set[str]:
    """Every module name ``path`` imports, anywhere in the file (relative imports resolved against
    ``package``, by default the file's own)."""
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def breaks(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in forbidden)


@pytest.mark.parametrize("target", sorted(FORBIDDEN))
def test_packages_do_not_import_what_they_must_not(target: str) -> None:
    files = sources(target)
    assert files, f"{target}: no sources (the table names a path that is gone)"
    found = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imported(path)
        if breaks(name, FORBIDDEN[target])
    }
    assert not found, sorted(found)


def test_the_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "def f():\n    import api_server\n    from shm_model.errors import X\n    from .settings import read\n"
    )
    names = imported(source, package="config")
    assert {"api_server", "shm_model.errors", "config.settings"} <= names
    assert [name for name in sorted(names) if breaks(name, FORBIDDEN["config"])] == [
        "api_server",
        "shm_model.errors",
        "shm_model.errors.X",
    ]


def test_the_client_imports_neither_pydantic_nor_torch_and_starts_fast() -> None:
    probe = (
        "import sys, time; t = time.perf_counter(); import shm_model.client; "
        "print(time.perf_counter() - t); "
        "print(sorted(m for m in ('pydantic', 'pydantic_settings', 'torch', 'api_server', 'fastapi') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    seconds, modules = done.stdout.splitlines()
    assert modules == "[]", modules
    assert float(seconds) < 1.0, seconds  # about 0.1 s measured; a generous bound against a heavy import
