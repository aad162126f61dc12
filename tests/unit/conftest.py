"""Fixtures of the in-process unit tests: a scripted host on a socket in a private directory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.fakehost import FakeHost, Respond, default_respond


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutation testing (scripts/mutation.sh), run a mutant's tests fastest first: the run
    stops at the first failure, so a detected mutant rarely waits for the slow whole-host tests.
    The durations are those mutmut recorded in its stats run."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def start(run_dir: Path) -> Iterator[Callable[..., FakeHost]]:
    hosts: list[FakeHost] = []

    def make(respond: Respond = default_respond, name: str = "host.sock") -> FakeHost:
        host = FakeHost(run_dir / name, respond)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.close()
