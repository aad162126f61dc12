"""Fixtures of the in-process unit tests: a scripted host on a socket in a private directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.fakehost import FakeHost, Respond, default_respond


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
