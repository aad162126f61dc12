"""Memory of N consumers: one model per process versus the shared host.

For each setup it starts the processes, lets each embed the same sample texts, then
sums RSS, PSS and USS over every process involved (host supervisor, workers and
clients, or the naive consumers) while all are alive. PSS sums are the honest joint
footprint: shared pages are split between the processes that map them.

    python -m benchmarks.memory --model bundled --consumers 2
    python -m benchmarks.memory --model kure --consumers 2 4 --json out.json
    python -m benchmarks.memory --model bundled,multilingual --consumers 2   # two models, one host
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import psutil

from benchmarks.common import ROOT, bench_env, end, host, model_location, progress
from shm_model.client import HostClient
from shm_model.memory import total_memory


def model_name(model: str) -> str:
    if model == "kure":
        from benchmarks.kure_model import build

        return str(build())
    return model


@dataclass
class Result:
    setup: str
    consumers: int
    rss: int
    pss: int
    uss: int
    seconds: float
    detail: dict[str, Any]


def _start_consumers(mode: str, model: str, n: int, env: dict[str, str]) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.consumer", mode, model],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(n)
    ]


def _wait_ready(
    procs: list[subprocess.Popen[str]], timeout: float = 600.0, waiting_for: str = "before it was ready"
) -> list[dict[str, Any]]:
    """Each consumer's next JSON line (a consumer that exits instead fails, saying when)."""
    out = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"consumer {proc.pid} exited with {proc.wait(timeout)} {waiting_for}")
        out.append(json.loads(line))
    return out


def _end(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        end(proc)


def run_naive(model: str, n: int, mode: str = "local") -> Result:
    started = time.perf_counter()
    procs = _start_consumers(mode, model, n, bench_env())
    try:
        ready = _wait_ready(procs)
        total = total_memory([p.pid for p in procs])
    finally:
        _end(procs)
    name = "naive (one model per process)" if mode == "local" else "naive, copied weights"
    return Result(
        name,
        n,
        **total,
        seconds=time.perf_counter() - started,
        detail={"first_vector_s": [r["first_vector_s"] for r in ready]},
    )


def run_host(model: str, n: int, placement: str, workers: int) -> Result:
    started = time.perf_counter()
    procs: list[subprocess.Popen[str]] = []
    env = {"SHM_MODEL_WEIGHTS": placement, "SHM_MODEL_WORKERS": str(workers)}
    with host(model, **env) as sock:
        try:
            procs = _start_consumers("client", model, n, bench_env(SHM_MODEL_SOCKET=sock))
            ready = _wait_ready(procs)
            with HostClient(sock) as client:
                status = client.status()
            host_total = total_memory([status["pid"]] + [w["pid"] for w in status["workers"]])
            clients_total = total_memory([p.pid for p in procs])
        finally:
            _end(procs)
    total = {k: host_total[k] + clients_total[k] for k in host_total}
    return Result(
        f"host, weights={placement}, {workers} workers",
        n,
        **total,
        seconds=time.perf_counter() - started,
        detail={
            "host": host_total,
            "clients": clients_total,
            "weights": status.get("weights"),
            "weight_bytes": status.get("weight_bytes"),
            "first_vector_s": [r["first_vector_s"] for r in ready],
        },
    )


def _weights_bytes(model: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, f))
        for name in model.split(",")
        for d, _, files in os.walk(model_location(name))
        for f in files
        if f.endswith((".safetensors", ".bin"))
    )


def run_all(model: str, consumers: list[int], placements: list[str], workers: int, copied: bool) -> list[Result]:
    """The reference (one in-process model) first, then every setup for each consumer count.

    A setup that would not fit in memory (copied weights: one private copy per consumer) is
    skipped, and one that fails is recorded with its error; the run goes on either way.
    """
    results = [run_naive(model, 1)]
    weights = _weights_bytes(model)
    for n in consumers:
        steps = [("naive (one model per process)", "local")]
        if copied:
            steps.append(("naive, copied weights", "copied"))
        steps += [(f"host, weights={p}, {workers} workers", p) for p in placements]
        for label, kind in steps:
            progress(f"memory: {n} consumers, {label}")
            needed = n * weights * 1.2 if kind == "copied" else 0
            available = psutil.virtual_memory().available
            if needed > 0.8 * available:
                results.append(
                    Result(
                        label,
                        n,
                        0,
                        0,
                        0,
                        0.0,
                        {"skipped": f"needs about {needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"},
                    )
                )
                continue
            try:
                if kind in ("local", "copied"):
                    results.append(run_naive(model, n, kind))
                else:
                    results.append(run_host(model, n, kind, workers))
            except Exception as exc:  # noqa: BLE001 - recorded in the results, the run goes on
                results.append(Result(label, n, 0, 0, 0, 0.0, {"error": f"{type(exc).__name__}: {exc}"}))
    return results


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of ``Result.__dict__`` rows; the first row is the one-model reference."""
    reference = rows[0]["pss"]
    lines = [
        "| setup | consumers | RSS sum (MB) | PSS sum (MB) | USS sum (MB) | PSS / one in-process model |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        why = r["detail"].get("skipped") or r["detail"].get("error")
        if why:
            lines.append(f"| {r['setup']} | {r['consumers']} | - | - | - | {why} |")
            continue
        lines.append(
            f"| {r['setup']} | {r['consumers']} | {r['rss'] / 2**20:,.0f} | {r['pss'] / 2**20:,.0f} | "
            f"{r['uss'] / 2**20:,.0f} | {r['pss'] / reference:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="bundled",
        help="bundled, kure (KURE-shaped, built on first use) or a path; several: a,b (one host serves them all)",
    )
    parser.add_argument("--consumers", type=int, nargs="+", default=[2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--placements", nargs="+", default=["auto", "shm"], choices=["auto", "shm"])
    parser.add_argument("--no-copied", action="store_true", help="skip the copied-weights naive setup")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    model = model_name(args.model)
    progress(f"model: {args.model} ({model})")
    results = run_all(model, args.consumers, args.placements, args.workers, not args.no_copied)
    print(table([r.__dict__ for r in results]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in results], fh, indent=2)


if __name__ == "__main__":
    main()
