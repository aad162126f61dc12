"""Every benchmark runs once in a tiny configuration, so that the scripts cannot rot. Both are
among the slow tests: they start one model process after another (on 2 cores, about 3 minutes
for ``benchmarks.run``, 40 s for ``benchmarks.mixed``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run as bench
from tests.conftest import ROOT, base_env

pytestmark = pytest.mark.slow


def run_tiny(module: str, out: Path) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE --tiny --out OUT``; fails the test with its stderr if it does not exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(600)
def test_tiny_benchmark_run_produces_every_section(tmp_path: Path) -> None:
    proc = run_tiny("benchmarks.run", tmp_path)
    results = json.loads((tmp_path / "tiny.json").read_text())
    bundled = results["models"]["bundled"]
    memory = bundled["memory"]
    assert [r["setup"] for r in memory] == ["naive (one model per process)"] * 2 + ["host, weights=auto, 2 workers"]
    assert all(r["pss"] > 0 and r["rss"] >= r["pss"] >= r["uss"] for r in memory)
    startup = bundled["startup"]
    assert 0 < startup["client_first_vector_s"] < startup["naive_first_vector_s"]
    assert set(startup["host_boot_s"]) == {"import", "load", "place", "fork_until_ready"}
    assert [o["batch_size"] for o in bundled["overhead"]] == [1, 8]
    assert all(o["in_process_ms"] > 0 and o["host_ms"] > 0 for o in bundled["overhead"])
    assert all(min(o["ratios"]) <= o["ratio"] <= max(o["ratios"]) for o in bundled["overhead"])
    assert all(len(o["ratios"]) == bench.OVERHEAD_ROUNDS for o in bundled["overhead"])
    concurrency = bundled["concurrency"]
    for system in ("host", "host_int8", "naive"):
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in concurrency[system])
    http = concurrency["http"]
    assert [r["clients"] for r in http["http"]] == [r["clients"] for r in http["client"]] == [1]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in http["http"] + http["client"])
    assert concurrency["st_pool"]["throughput_sentences_per_s"] > 0
    assert concurrency["host_bulk"]["throughput_sentences_per_s"] > 0
    assert concurrency["infinity"] == {"error": "skipped in this mode"}
    assert results["transport"]["ping"]["p50_us"] > 0
    report = (tmp_path / "tiny.md").read_text()
    assert "### Memory" in report and "| host (dynamic batching) | 2 |" in report
    assert "| host, SHM_MODEL_DTYPE=int8 | 2 |" in report and "| int8 / float32 (req/s) |" in report
    assert "/v1/embeddings req/s" in report
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
    assert "ending every process" not in proc.stderr


@pytest.mark.timeout(600)
def test_tiny_mixed_load_run_reports_queries_during_an_ingestion(tmp_path: Path) -> None:
    run_tiny("benchmarks.mixed", tmp_path)
    results = json.loads((tmp_path / "mixed-tiny.json").read_text())
    run = results["models"]["bundled"]["runs"][0]
    assert run["idle_p50_ms"] > 0 and run["bulk_alone_passages_per_s"] > 0
    assert run["mixed"]["queries"] > 0 and run["mixed"]["bulk"]["passages"] == 64
    assert run["queries_as_bulk"]["queries"] > 0 and run["bulk_batch_ms"] > 0
    assert "| bundled | 64 |" in (tmp_path / "mixed-tiny.md").read_text()
    assert (tmp_path / "mixed-tiny.png").stat().st_size > 10_000
