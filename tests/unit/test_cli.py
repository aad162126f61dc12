"""The ``shm-model`` command against a scripted host in process: what each command prints, its exit code."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from shm_model import cli
from shm_model.errors import ConfigError, ModelLoadError, Overloaded
from shm_model.protocol import error_reply, result_reply, vectors_reply
from tests.unit.fakehost import FakeHost

STATUS: dict[str, Any] = {
    "model": "dummy",
    "device": "cpu",
    "dimension": 32,
    "max_seq_length": 128,
    "pid": 4242,
    "uptime_s": 12.4,
    "generation": 3,
    "start_method": "fork",
    "threads_per_worker": 1,
    "cores": 2,
    "weight_bytes": 3 * 2**20,
    "weight_placement": "auto",
    "weights": {"file": 2**20, "shm": 2 * 2**20},
    "in_flight": 1,
    "queue_size": 64,
    "queue_depth": 5,
    "queue": {
        "interactive": {
            "requests": 2,
            "texts": 7,
            "served_requests": 10,
            "batches": 4,
            "wait_ms": {"p50": 1.25, "p99": None},
        },
        "bulk": {"requests": 0},  # no wait figures: not printed
        "note": "x",
    },
    "memory": {"rss": 10 * 2**20, "pss": 5 * 2**20, "uss": 2**20},
    "workers": [
        {"pid": 11, "generation": 3, "state": "idle", "requests_served": 9, "batches": 4, "rss": 2**20},
        {"pid": 12, "generation": 3, "state": "busy", "requests_served": 1, "batches": 1},
    ],
}


def respond(header: dict[str, Any]) -> bytes:
    op = header["op"]
    if op == "status":
        return result_reply(header["id"], STATUS)
    if op == "encode":
        rows = [[3.0, 4.0] + [0.0] * 6 if t == "a" else [1.0] * 8 for t in header["texts"]]
        return vectors_reply(header["id"], np.array(rows), tokens=len(rows))
    if op == "reload":
        return result_reply(header["id"], {"model": "dummy", "generation": 4})
    return result_reply(header["id"], {"pid": 4242})


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def host(start: Callable[..., FakeHost], monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    monkeypatch.delenv("SHM_MODEL_SOCKET", raising=False)
    return start(respond)


def test_status_prints_model_supervisor_weights_queue_memory_and_workers(
    host: FakeHost, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run(["--socket", host.path, "status"], capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "model        dummy (cpu, dim 32, max 128 tokens)",
        "supervisor   pid 4242, up 12s, generation 3, fork workers x 1 threads (2 cores)",
        "weights      3.0 MB, placement auto {'file': '1.0 MB', 'shm': '2.0 MB'}",
        "queue        1 in flight / 64, 5 pieces waiting",
        "  interactive2 requests (7 texts) waiting; served 10 requests in 4 batches; wait p50 1.2 ms p99 -",
        "memory       RSS 10.0 MB  PSS 5.0 MB  USS 1.0 MB (host process tree)",
        "     pid  gen state      requests  batches        RSS        PSS        USS",
        "      11    3 idle              9        4     1.0 MB          -          -",
        "      12    3 busy              1        1          -          -          -",
    ]
    assert os.environ["SHM_MODEL_SOCKET"] == host.path  # --socket is passed on to what the command starts


def test_status_json_is_the_whole_status(
    host: FakeHost, start: Callable[..., FakeHost], capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = run(["--socket", host.path, "status", "--json"], capsys)
    assert code == 0
    assert json.loads(out) == STATUS
    assert out.startswith('{\n  "model": "dummy"')
    host = start(lambda h: result_reply(h["id"], {**STATUS, "model": "modèle"}), name="accents.sock")
    assert run(["--socket", host.path, "status", "--json"], capsys)[1].startswith('{\n  "model": "modèle"')


def test_status_without_optional_figures(start: Callable[..., FakeHost], capsys: pytest.CaptureFixture) -> None:
    bare = {k: v for k, v in STATUS.items() if k not in ("weights", "queue", "weight_bytes", "cores")}
    host = start(lambda h: result_reply(h["id"], bare))
    code, out, _ = run(["--socket", host.path, "status"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].endswith("(None cores)")
    assert lines[2] == "weights      -, placement auto {}"
    assert "wait p50" not in out


def test_encode_prints_a_line_per_text_or_json(host: FakeHost, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(["--socket", host.path, "encode", "a", "b" * 70], capsys)
    assert code == 0
    assert out.splitlines() == [
        "dim=8 norm=5.0000 [+3.0000 +4.0000 +0.0000 +0.0000 +0.0000 +0.0000 ...] 'a'",
        f"dim=8 norm=2.8284 [+1.0000 +1.0000 +1.0000 +1.0000 +1.0000 +1.0000 ...] {'b' * 60!r}",
    ]
    assert "prompt_name" not in host.headers[-1]
    code, out, _ = run(
        ["--socket", host.path, "encode", "--json", "--normalize", "--prompt-name", "query", "a"], capsys
    )
    assert code == 0
    assert out.endswith("\n") and json.loads(out) == [[0.6000000238418579, 0.800000011920929] + [0.0] * 6]
    assert host.headers[-1]["prompt_name"] == "query"


def test_encode_reads_lines_from_stdin(
    host: FakeHost, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb \nX\n"))
    code, out, _ = run(["--socket", host.path, "encode", "--json", "-"], capsys)
    assert code == 0
    assert host.headers[-1]["texts"] == ["a", "b ", "X"]  # only the line end is taken off
    assert len(json.loads(out)) == 3


def test_reload_and_stop(host: FakeHost, capsys: pytest.CaptureFixture) -> None:
    assert run(["--socket", host.path, "reload"], capsys) == (0, "reloaded dummy: generation 4\n", "")
    assert 599_000 < host.headers[-1]["timeout_ms"] <= 600_000  # a reload waits for a model load
    assert run(["--socket", host.path, "--timeout", "900", "reload"], capsys)[0] == 0
    assert 899_000 < host.headers[-1]["timeout_ms"] <= 900_000
    assert run(["--socket", host.path, "stop"], capsys) == (0, "host pid 4242 is stopping\n", "")
    assert run(["--socket", host.path, "--timeout", "2", "stop"], capsys)[0] == 0
    assert host.headers[-1]["timeout_ms"] <= 2000


def test_errors_exit_with_their_code_and_one_line(
    start: Callable[..., FakeHost], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    busy = start(lambda h: error_reply(h["id"], Overloaded("queue full")))
    assert run(["--socket", busy.path, "stop"], capsys) == (1, "", "shm-model: overloaded: queue full\n")
    missing = str(tmp_path / "none.sock")
    code, _, err = run(["--socket", missing, "status"], capsys)
    assert code == 1 and err.startswith("shm-model: host_unavailable: no host is serving")

    def raising(exc: BaseException) -> Callable[[Any], int]:
        def func(args: Any) -> int:
            raise exc

        return func

    for exc, expected in (
        (ConfigError("SHM_MODEL_WORKERS=x is invalid"), (2, "", "shm-model: error: SHM_MODEL_WORKERS=x is invalid\n")),
        (ModelLoadError("model 'x' not found"), (2, "", "shm-model: error: model 'x' not found\n")),
        (KeyboardInterrupt(), (130, "", "")),
    ):
        monkeypatch.setattr(cli, "_stop", raising(exc))
        assert run(["stop"], capsys) == expected
    assert cli.EXIT_USAGE == 2


def test_unknown_arguments_are_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "--bogus", "extra"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus extra" in capsys.readouterr().err


def test_api_runs_the_api_server_with_the_arguments_that_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str]]] = []

    def execv(path: str, argv: list[str]) -> None:
        calls.append((path, argv))
        raise SystemExit(0)

    monkeypatch.setattr(cli.os, "execv", execv)
    with pytest.raises(SystemExit):
        cli.main(["api", "--port", "9000", "--help"])
    assert calls == [(sys.executable, [sys.executable, "-m", "api_server", "--port", "9000", "--help"])]


def test_serve_sets_up_logging_then_runs_the_supervisor_single_threaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import shm_model.host as host_package
    from shm_model import logs

    events: list[Any] = []

    class Supervisor:
        def __init__(self, model_cfg: Any, host_cfg: Any) -> None:
            events.append(("supervisor", model_cfg.name, host_cfg.backend))

        def run(self) -> int:
            return 7

    monkeypatch.setattr(host_package, "Supervisor", Supervisor)
    monkeypatch.setattr(host_package, "single_threaded", lambda: events.append("single"))
    monkeypatch.setattr(logs, "setup", lambda level, role=None: events.append(("logs", level, role)))
    monkeypatch.setenv("SHM_MODEL_BACKEND", "dummy")
    monkeypatch.setenv("SHM_MODEL_LOG_LEVEL", "warning")
    monkeypatch.setenv("MODEL_NAME", "bundled")
    assert cli.main(["serve"]) == 7
    assert events == [("logs", "warning", "supervisor"), "single", ("supervisor", "bundled", "dummy")]


def test_help_lists_the_commands_and_the_settings(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: shm-model [-h] [--socket SOCKET] [--timeout TIMEOUT] COMMAND")
    for command in ("serve", "status", "encode", "reload", "stop", "api"):
        assert f"    {command}" in out
    assert "SHM_MODEL_SOCKET" in out and "(settings)" not in out
    with pytest.raises(SystemExit):
        cli.main(["encode", "--help"])
    out = capsys.readouterr().out
    assert "--prompt-name PROMPT_NAME" in out and "SHM_MODEL_WORKERS" in out


def test_sizes_and_times_print_a_dash_when_unknown() -> None:
    assert cli._mb(None) == "-"
    assert cli._mb(3 * 2**20 + 2**19) == "3.5 MB"
    assert cli._ms(None) == "-"
    assert cli._ms(1.26) == "1.3 ms"


def test_status_prints_health_headroom_and_restarts(
    start: Callable[..., FakeHost], capsys: pytest.CaptureFixture
) -> None:
    degraded = {
        **STATUS,
        "health": {"status": "degraded", "reasons": {"memory": "little headroom", "errors": "5% of requests failed"}},
        "memory_pressure": {"headroom": 2**30, "ceiling": 4 * 2**30},
        "restarts": {"oom_kill": 1, "watchdog": 2},
        "queue": {  # a class without wait figures does not end the list
            "bulk": {"requests": 0},
            "interactive": {
                "requests": 1,
                "texts": 2,
                "served_requests": 3,
                "batches": 3,
                "wait_ms": {"p50": 0.5, "p99": 7.25},
            },
        },
        "workers": [{**STATUS["workers"][0], "pss": 2**21, "uss": 3 * 2**20}],
    }
    host = start(lambda h: result_reply(h["id"], degraded))
    code, out, _ = run(["--socket", host.path, "status"], capsys)
    assert code == 0
    lines = out.splitlines()
    at = lines.index("health       degraded: little headroom; 5% of requests failed")
    assert lines[at - 1].startswith("memory       RSS")
    assert lines[at + 1] == "             1024.0 MB free of 4096.0 MB; restarts: oom_kill 1, watchdog 2"
    assert lines[at + 2].split() == ["pid", "gen", "state", "requests", "batches", "RSS", "PSS", "USS"]
    assert lines[at + 3] == "      11    3 idle              9        4     1.0 MB     2.0 MB     3.0 MB"
    assert lines[4] == (
        "  interactive1 requests (2 texts) waiting; served 3 requests in 3 batches; wait p50 0.5 ms p99 7.2 ms"
    )
    healthy = {**STATUS, "health": {"status": "ok", "reasons": {}}}
    host = start(lambda h: result_reply(h["id"], healthy), name="healthy.sock")
    code, out, _ = run(["--socket", host.path, "status"], capsys)
    lines = out.splitlines()
    at = lines.index("health       ok")
    assert lines[at + 1] == "             - free of -; restarts: "


COMMAND_HELP = {
    (): """usage: shm-model [-h] [--socket SOCKET] [--timeout TIMEOUT] COMMAND ...

Host one sentence-embedding model for many processes: the weights live once in shared memory, \
forked workers encode, clients talk over a Unix socket.

positional arguments:
  COMMAND
    serve            run the host in the foreground (SIGTERM/SIGINT drain, SIGHUP reloads)
    status           show the running host: model, workers, queue, memory
    encode           embed TEXT arguments (or '-' for one text per stdin line)
    reload           load the model again and replace the workers without failing requests
    stop             stop the host gracefully (in-flight requests finish)
    api              run the chat (RAG) API server on the host: runs shm-model-api with the
                     arguments that follow (see 'shm-model api --help')

options:
  -h, --help         show this help message and exit
  --socket SOCKET    host socket (default: SHM_MODEL_SOCKET or its default)
  --timeout TIMEOUT  request timeout in seconds
""",
    ("status",): """usage: shm-model status [-h] [--json]

show the running host: model, workers, queue, memory

options:
  -h, --help  show this help message and exit
  --json      print the full status as JSON
""",
    ("encode",): """usage: shm-model encode [-h] [--normalize] [--prompt-name PROMPT_NAME] [--json] text [text ...]

embed TEXT arguments (or '-' for one text per stdin line)

positional arguments:
  text                  texts to embed, or - to read lines from stdin

options:
  -h, --help            show this help message and exit
  --normalize           L2-normalise the vectors
  --prompt-name PROMPT_NAME
                        a prompt of the model, e.g. query
  --json                print the vectors as a JSON array
""",
    ("serve",): "usage: shm-model serve [-h]\n\n"
    "run the host in the foreground (SIGTERM/SIGINT drain, SIGHUP reloads)\n\n"
    "options:\n  -h, --help  show this help message and exit\n",
    ("reload",): "usage: shm-model reload [-h]\n\n"
    "load the model again and replace the workers without failing requests\n\n"
    "options:\n  -h, --help  show this help message and exit\n",
    ("stop",): "usage: shm-model stop [-h]\n\n"
    "stop the host gracefully (in-flight requests finish)\n\n"
    "options:\n  -h, --help  show this help message and exit\n",
}


@pytest.mark.parametrize("command", list(COMMAND_HELP))
def test_each_command_s_help_then_the_settings(
    command: tuple[str, ...], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    head, settings = out.split("\nenvironment variables", 1)
    assert head == COMMAND_HELP[command]
    assert "SHM_MODEL_SOCKET" in settings


def test_a_command_is_required(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "error: the following arguments are required: COMMAND" in capsys.readouterr().err


def test_encode_options_default_off() -> None:
    args = cli.build_parser().parse_args(["encode", "a", "b"])
    assert (args.text, args.normalize, args.prompt_name, args.json, args.func) == (
        ["a", "b"], False, None, False, cli._encode,
    )  # fmt: skip
    args = cli.build_parser().parse_args(["--timeout", "2.5", "status", "--json"])
    assert (args.timeout, args.json, args.func, args.socket) == (2.5, True, cli._status, None)
    for name, func in (("serve", cli._serve), ("reload", cli._reload), ("stop", cli._stop)):
        assert cli.build_parser().parse_args([name]).func is func
