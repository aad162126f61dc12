"""Mixed load: single queries from one process while another ingests documents through the host.

    python -m benchmarks.mixed --quick      # the bundled model, 3 runs
    python -m benchmarks.mixed --full       # the bundled and the KURE-shaped model, 3 runs each
    python -m benchmarks.mixed --kure       # the KURE-shaped model only, 48 passages, 3 runs
    python -m benchmarks.mixed --tiny       # under a minute, for the slow tests

For each model and run: the query latency when the host is idle, the bulk job's throughput
alone, then both at once (queries as ``interactive``, the bulk job as ``bulk``; and, for
comparison, the same queries sent as ``bulk`` too, so that they only take turns with the
ingestion). Queries arrive as a Poisson stream (open loop, a fixed seed). Figures are
medians over the runs. Results go to benchmarks/results/mixed-<mode>.json, .md and .png
(query latency over time during the ingestion).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from benchmarks import common, memory
from benchmarks.common import bench_env, end, host, percentile, progress, spawn
from shm_model.client import HostClient

QUERIES = [
    "서울특별시 2023년 인구는?",
    "등록금 장학금 지급 현황",
    "해운대구 관광객 수",
    "수수료 납부 기준은 무엇인가요",
    "quarterly revenue by region",
]
PARAGRAPH = (
    "서울특별시의 2023년 인구는 약 940만 명으로 전년보다 조금 줄었다. 표 3은 연도별 등록금과 장학금 지급 "
    "현황을 보여준다. 부산광역시 해운대구의 관광객 수는 해마다 늘고 있으며, 여름철에 가장 많다. 제12조(수수료) "
    "신청인은 별표 2에 따른 수수료를 납부하여야 한다. "
)
#: The bulk job, in its own process: embeds passages as the document processor does.
BULK_CODE = """
import json, sys, time
from shm_model.client import HostClient
sock, count = sys.argv[1], int(sys.argv[2])
para = sys.argv[3]
texts = [f"{i}. " + para * (1 + i % 3) for i in range(count)]
client = HostClient(sock, timeout=3600)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
started = time.perf_counter()
for i in range(0, count, 64):
    client.encode(texts[i : i + 64], priority="bulk")
elapsed = time.perf_counter() - started
print(json.dumps({"passages": count, "seconds": elapsed, "started": time.time() - elapsed}), flush=True)
"""


@dataclass(frozen=True)
class Plan:
    mode: str
    models: list[str]
    runs: int
    passages: dict[str, int]
    query_interval: dict[str, float]
    idle_queries: int


#: Seed of the query arrival times: every run and mode sees the same stream.
ARRIVAL_SEED = 20261125

PLANS = {
    "tiny": Plan("tiny", ["bundled"], 1, {"bundled": 64}, {"bundled": 0.05}, 5),
    "quick": Plan("quick", ["bundled"], 3, {"bundled": 600}, {"bundled": 0.1}, 30),
    "kure": Plan("kure", ["kure"], 3, {"kure": 48}, {"kure": 2.0}, 15),
    "full": Plan(
        "full",
        ["bundled", "kure"],
        3,
        {"bundled": 600, "kure": 96},
        {"bundled": 0.1, "kure": 2.0},
        30,
    ),
}


def _bulk_process(sock: str, count: int) -> subprocess.Popen[str]:
    proc = spawn(
        [sys.executable, "-c", BULK_CODE, sock, str(count), PARAGRAPH],
        env=bench_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the bulk process failed: {proc.stderr.read() if proc.stderr else ''}")
    return proc


def _run_bulk(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    end(proc)
    if not line:
        raise RuntimeError(f"the bulk process died: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    result = json.loads(line)
    result["passages_per_s"] = result["passages"] / result["seconds"]
    return result


def _idle(client: HostClient, count: int) -> list[float]:
    latencies = []
    for i in range(count):
        began = time.perf_counter()
        client.encode(QUERIES[i % len(QUERIES)], priority="interactive")
        latencies.append(time.perf_counter() - began)
    return latencies


def _mixed(sock: str, client: HostClient, passages: int, interval: float, priority: str) -> dict[str, Any]:
    """The bulk job in another process; meanwhile queries from this one arrive as a Poisson
    stream (mean gap ``interval`` s, a fixed seed), each sent when it arrives whether or not the
    previous one was answered: an open loop, so that queries do not fall into step with the
    bulk batches."""
    proc = _bulk_process(sock, passages)
    samples: list[tuple[float, float]] = []  # (seconds since the bulk job started, latency)
    finished = threading.Event()
    outcome: dict[str, Any] = {}
    lock = threading.Lock()

    def bulk() -> None:
        try:
            outcome.update(_run_bulk(proc))
        finally:
            finished.set()

    def query(i: int, at: float) -> None:
        began = time.perf_counter()
        client.encode(QUERIES[i % len(QUERIES)], priority=priority)
        with lock:
            samples.append((at, time.perf_counter() - began))

    gaps = random.Random(ARRIVAL_SEED)
    started = time.time()
    runner = threading.Thread(target=bulk)
    runner.start()
    senders: list[threading.Thread] = []
    i = 0
    due = gaps.expovariate(1.0 / interval)
    while not finished.wait(max(0.0, due - (time.time() - started))):
        sender = threading.Thread(target=query, args=(i, time.time() - started))
        sender.start()
        senders.append(sender)
        i += 1
        due += gaps.expovariate(1.0 / interval)
    runner.join()
    for sender in senders:
        sender.join()
    samples.sort()
    latencies = [s[1] for s in samples]
    return {
        "bulk": outcome,
        "queries": len(samples),
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "max_ms": max(latencies) * 1e3 if latencies else float("nan"),
        "samples": samples,
    }


def _bulk_batch_ms(status: dict[str, Any], quantile: str = "p50") -> float:
    """The time of a bulk batch (median or p99 of recent batches), as the host measured it."""
    value = status["queue"]["bulk"]["batch_ms"][quantile]
    return float("nan") if value is None else float(value)


def run_model(plan: Plan, name: str) -> dict[str, Any]:
    model = memory.model_name(name)
    passages, interval = plan.passages[name], plan.query_interval[name]
    runs = []
    # A call of 64 KURE passages may take minutes on a busy machine: past the host's 300 s cap.
    with host(model, SHM_MODEL_MAX_REQUEST_TIMEOUT="3600") as sock, HostClient(sock, timeout=3600) as client:
        client.encode([PARAGRAPH] * 8, priority="bulk")  # warm-up, and the host learns the batch time
        for r in range(plan.runs):
            idle = _idle(client, plan.idle_queries)
            alone = _run_bulk(_bulk_process(sock, passages))
            mixed = _mixed(sock, client, passages, interval, "interactive")
            status = client.status()
            batch_ms = _bulk_batch_ms(status)
            batch_p99_ms = _bulk_batch_ms(status, "p99")
            turns = _mixed(sock, client, passages, interval, "bulk")
            idle_p50 = percentile(idle, 50) * 1e3
            row = {
                "run": r + 1,
                "idle_p50_ms": idle_p50,
                "bulk_alone_passages_per_s": alone["passages_per_s"],
                "mixed": mixed,
                "bulk_batch_ms": batch_ms,
                "bulk_batch_p99_ms": batch_p99_ms,
                "bulk_kept": mixed["bulk"]["passages_per_s"] / alone["passages_per_s"],
                "queries_as_bulk": turns,
            }
            runs.append(row)
            progress(
                f"mixed {name} run {r + 1}: idle p50 {idle_p50:.1f} ms; during ingestion p50 "
                f"{mixed['p50_ms']:.1f} p99 {mixed['p99_ms']:.1f} ms (as bulk: p99 {turns['p99_ms']:.1f} ms); "
                f"bulk {row['bulk_kept']:.2f}x its throughput alone ({alone['passages_per_s']:.2f} passages/s); "
                f"bulk batch {batch_ms:.0f} ms"
            )
    keys = ("idle_p50_ms", "bulk_alone_passages_per_s", "bulk_batch_ms", "bulk_batch_p99_ms", "bulk_kept")
    summary = {k: statistics.median(r[k] for r in runs) for k in keys}
    for k in ("p50_ms", "p99_ms", "max_ms"):
        summary[f"mixed_{k}"] = statistics.median(r["mixed"][k] for r in runs)
        summary[f"as_bulk_{k}"] = statistics.median(r["queries_as_bulk"][k] for r in runs)
    summary["mixed_bulk_passages_per_s"] = statistics.median(r["mixed"]["bulk"]["passages_per_s"] for r in runs)
    return {"model": model, "passages": passages, "query_interval_s": interval, "runs": runs, "median": summary}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Mixed load ({results['mode']})",
        "",
        f"`{results['command']}` on {results['machine']}, {results['started']}. Median of "
        f"{results['runs']} runs. One process ingests passages (`bulk`, 64 a call) while queries from "
        "another arrive as a Poisson stream (`interactive`, open loop, fixed seed); "
        "'as bulk' sends the same queries as `bulk`, so that they only take turns with the ingestion.",
        "",
        "| model | passages | idle p50 | during ingestion p50 / p99 / max | as bulk p99 | one bulk batch "
        "p50 / p99 | bulk alone | bulk during queries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        s = m["median"]
        lines.append(
            f"| {name} | {m['passages']} | {s['idle_p50_ms']:.1f} ms | {s['mixed_p50_ms']:.1f} / "
            f"{s['mixed_p99_ms']:.1f} / {s['mixed_max_ms']:.1f} ms | {s['as_bulk_p99_ms']:.1f} ms | "
            f"{s['bulk_batch_ms']:.0f} / {s['bulk_batch_p99_ms']:.0f} ms | "
            f"{s['bulk_alone_passages_per_s']:.1f} passages/s | {s['mixed_bulk_passages_per_s']:.1f} passages/s "
            f"({s['bulk_kept']:.2f}x) |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return str(exc)
    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        m = results["models"][name]
        first = m["runs"][0]
        for label, run in (("interactive", first["mixed"]), ("as bulk", first["queries_as_bulk"])):
            xs = [s[0] for s in run["samples"]]
            ys = [s[1] * 1e3 for s in run["samples"]]
            ax.plot(xs, ys, marker=".", linewidth=0.8, label=f"query sent {label}")
        ax.axhline(first["idle_p50_ms"], color="grey", linestyle="--", label="idle p50")
        ax.set_title(f"{name}: query latency during an ingestion of {m['passages']} passages")
        ax.set_xlabel("seconds since the ingestion started")
        ax.set_ylabel("query latency (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run(plan: Plan, out_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {
        **common.results_header("benchmarks.mixed", plan.mode),
        "runs": plan.runs,
        "models": {name: run_model(plan, name) for name in plan.models},
    }
    common.write_results(os.path.join(out_dir, f"mixed-{plan.mode}"), results, markdown, plot)
    return results


def main(argv: list[str] | None = None) -> int:
    return common.main(__doc__, PLANS, run, argv, repeated="every measurement of each model")


if __name__ == "__main__":
    sys.exit(main())
