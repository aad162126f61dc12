"""Helpers shared by the benchmarks: environment, processes that always end, a host to measure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIVE: list[subprocess.Popen[Any]] = []
#: The texts of every concurrency benchmark, sent one a request in turn by each system measured
#: (the host, one model per process, infinity-emb, the HTTP route), so that they encode the same.
SENTENCES = (
    "서울특별시의 2023년 인구는 약 940만 명이다.",
    "표 3은 연도별 등록금과 장학금 지급 현황을 보여준다.",
    "The quarterly report lists revenue, cost and margin by region.",
    "부산광역시 해운대구의 관광객 수는 해마다 늘고 있다.",
    "제12조(수수료) 신청인은 별표 2에 따른 수수료를 납부하여야 한다.",
    "Average latency stayed under ten milliseconds during the test.",
)


def bench_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHM_MODEL_", "MODEL_"))}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def model_location(model: str) -> str:
    """The folder SentenceTransformer loads for ``model`` (a path, a hub id or an alias)."""
    from config.model_config import ModelConfig
    from workers.model_source import resolve_model

    return resolve_model(ModelConfig(name=model)).location


def spawn(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a process that ``end_all`` (run on exit and on Ctrl-C) will end."""
    proc = subprocess.Popen(list(args), cwd=ROOT, start_new_session=True, **kwargs)
    _LIVE.append(proc)
    return proc


def end(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    if proc.stdin:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc in _LIVE:
        _LIVE.remove(proc)


def end_all() -> None:
    for proc in list(_LIVE):
        end(proc, timeout=5)


@contextlib.contextmanager
def host(model: str, **env: str) -> Iterator[str]:
    """Run ``shm-model serve`` on ``model`` and yield its socket; it is stopped afterwards. A host
    that exits before it answers fails at once, with the last lines of its log."""
    from shm_model.client import wait_for_host
    from shm_model.errors import HostUnavailable

    with tempfile.TemporaryDirectory(prefix="shm-bench-") as tmp:
        sock = os.path.join(tmp, "run", "host.sock")
        full_env = bench_env(MODEL_NAME=model, SHM_MODEL_SOCKET=sock, SHM_MODEL_LOG_LEVEL="warning", **env)
        log = os.path.join(tmp, "host.log")
        with open(log, "w") as out:
            proc = spawn(
                [sys.executable, "-m", "shm_model", "serve"],
                env=full_env,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        try:
            try:
                wait_for_host(sock, timeout=600, process=proc)
            except HostUnavailable as exc:
                with open(log, errors="replace") as f:
                    tail = f.read()[-2000:].strip()
                raise RuntimeError(f"{exc}:\n{tail}") from None
            yield sock
        finally:
            end(proc, timeout=60)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def results_header(module: str, mode: str) -> dict[str, Any]:
    """What every results file starts with: mode, machine, the command that made it, when."""
    import platform

    return {
        "mode": mode,
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "command": f"python -m {module} --{mode}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(
    base: str,
    results: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], str], str | None],
) -> None:
    """Write ``base``.json, .md and .png (the plot says why when it cannot draw)."""
    import json

    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    with open(base + ".md", "w") as fh:
        fh.write(markdown(results))
    problem = plot(results, base + ".png")
    if problem:
        progress(f"no plot: {problem}")
    progress(f"wrote {base}.json, .md{'' if problem else ', .png'}")


def main(
    doc: str | None,
    plans: Mapping[str, Any],
    run: Callable[[Any, str], object],
    argv: list[str] | None,
    *,
    repeated: str = "the concurrency section",
) -> int:
    """The benchmarks' command line: one of --tiny/--quick/--full (quick by default), --out, and
    --runs when every plan has ``runs`` (``repeated`` says what a run repeats)."""
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    for mode in plans:
        group.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode, help=f"{mode} mode")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="results directory")
    repeatable = all(hasattr(plan, "runs") for plan in plans.values())
    if repeatable:
        parser.add_argument(
            "--runs",
            type=int,
            metavar="N",
            help=f"repeat {repeated} N times and report medians (default: the mode's, "
            f"{', '.join(f'{mode} {plan.runs}' for mode, plan in plans.items())})",
        )
    args = parser.parse_args(argv)
    plan = plans[args.mode or "quick"]
    if repeatable and args.runs is not None:
        if args.runs < 1:
            parser.error("--runs must be at least 1")
        plan = dataclasses.replace(plan, runs=args.runs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run(plan, args.out)
    except KeyboardInterrupt:
        progress("interrupted; ending every process started")
        return 130
    finally:
        end_all()
    return 0
