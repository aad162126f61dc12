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

#: The apps and the HTTP stack: nothing of the host, its workers or config imports them.
APPS = ("api_server", "api", "tablerag", "rag_with_tables", "benchmarks", "fastapi", "uvicorn", "starlette")
#: The layers above the client: the manager, the supervisor and the CLI.
ABOVE_CLIENT = ("shm_model.manager", "shm_model.host", "shm_model.cli")

# Layers, lowest first: errors, protocol and the pure queue rules; config; workers and the client;
# the manager and the host (supervisor); the CLI; the apps (API, document processor, benchmarks).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "config": ("shm_model", "workers", "torch", *APPS),
    "shm_model/errors.py": ("shm_model", "workers", *APPS),
    "shm_model/protocol.py": ("shm_model.client", "shm_model.scheduling", "workers", *ABOVE_CLIENT, *APPS),
    "shm_model/scheduling.py": ("shm_model.client", "workers", "config", *ABOVE_CLIENT, *APPS),
    "shm_model/client.py": ("workers", "pydantic", *ABOVE_CLIENT, *APPS),  # torch only for convert_to_tensor
    "shm_model/manager.py": ("shm_model.host", "shm_model.cli", *APPS),
    "shm_model/host": ("shm_model.manager", "shm_model.cli", "shm_model.client", *APPS),
    "shm_model/cli.py": APPS,
    "shm_model": APPS,
    "workers": ("shm_model.client", *ABOVE_CLIENT, *APPS),
    "tablerag": ("api_server", "api", "fastapi", "uvicorn", "starlette", "shm_model.host", "workers"),
    # The HTTP app's parts: the model only through the manager; the entry point assembles them.
    "api": ("api_server", "rag_with_tables", "benchmarks", "workers", "torch", "shm_model.client", "shm_model.host"),
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


def test_the_api_rule_flags_the_api_package_and_nothing_named_like_it(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "import api\nfrom api.state import AppState\nfrom .routers import rag\n"
        "from config.api_config import ApiConfig\nimport apispec\nimport fastapi_utils\n"
    )
    names = imported(source, package="api")
    assert [name for name in sorted(names) if breaks(name, FORBIDDEN["tablerag"])] == [
        "api",
        "api.routers",
        "api.routers.rag",
        "api.state",
        "api.state.AppState",
    ]


def test_the_job_runner_loads_without_fastapi() -> None:
    probe = "import sys, tablerag.jobs; print(sorted(m for m in ('fastapi', 'starlette', 'api') if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.serial  # the import within 1 s
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
