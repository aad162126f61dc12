"""The benchmarks' median of several runs: figures, ratios within a run, and the report."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import run as bench


def rows(rates: dict[int, float], p50: float = 10.0, errors: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "clients": n,
            "requests": 100,
            "errors": errors,
            "first_error": "boom" if errors else None,
            "throughput_rps": rps,
            "p50_ms": p50,
            "p99_ms": 2 * p50,
        }
        for n, rps in rates.items()
    ]


def one_run(host: float, naive: float, infinity: float | None, bulk: float = 300.0) -> dict[str, Any]:
    """A concurrency result at 1 and 16 clients with the given req/s per system."""
    return {
        "host": rows({1: host, 16: 4 * host}, p50=10.0),
        "host_int8": rows({1: 2 * host, 16: 6 * host}),
        "naive": rows({1: naive}),
        "http": {"http": rows({1: host / 2}), "client": rows({1: host})},
        "st_pool": {"sentences": 64, "seconds": 0.2, "throughput_sentences_per_s": 320.0},
        "host_bulk": {"sentences": 64, "seconds": 64 / bulk, "throughput_sentences_per_s": bulk},
        "infinity": (
            {"version": "0.0.78", "levels": rows({1: infinity, 16: infinity}, p50=20.0)}
            if infinity
            else {"error": "infinity did not start: port in use"}
        ),
    }


def test_ratios_are_taken_within_each_run_then_their_median() -> None:
    # Run 2 is twice as fast for every system: its figures move, its ratios do not.
    runs = [one_run(100, 100, 50), one_run(200, 100, 100), one_run(90, 100, 45)]
    c = bench.combine_runs(runs)
    assert c["runs"] == 3 and c["each_run"] == runs
    assert [r["throughput_rps"] for r in c["host"]] == [100, 400]  # medians of 100/200/90, 400/800/360
    assert c["host"][0]["requests"] == 300 and c["host"][0]["errors"] == 0
    level1 = c["ratios"]["levels"][0]
    assert level1["clients"] == 1
    assert level1["host_vs_naive"] == {"median": 1.0, "min": 0.9, "max": 2.0, "runs": 3}
    assert level1["host_vs_infinity"] == {"median": 2.0, "min": 2.0, "max": 2.0, "runs": 3}
    assert level1["p50_vs_infinity"]["median"] == pytest.approx(0.5)
    assert level1["int8_vs_float32"]["median"] == pytest.approx(2.0)
    assert c["ratios"]["levels"][1]["host_vs_naive"] is None  # no naive run at 16 clients
    assert c["ratios"]["levels"][1]["int8_vs_float32"]["median"] == pytest.approx(1.5)
    assert c["ratios"]["http"] == [{"clients": 1, "http_vs_client": {"median": 0.5, "min": 0.5, "max": 0.5, "runs": 3}}]
    assert c["ratios"]["bulk_vs_pool"]["median"] == pytest.approx(300 / 320)


def test_a_failed_infinity_run_is_left_out_and_said() -> None:
    c = bench.combine_runs([one_run(100, 100, 50), one_run(100, 100, None), one_run(100, 100, 25)])
    assert [r["throughput_rps"] for r in c["infinity"]["levels"]] == [37.5, 37.5]
    assert c["infinity"]["note"] == "1 of 3 runs failed: infinity did not start: port in use"
    assert c["ratios"]["levels"][0]["host_vs_infinity"] == {"median": 3.0, "min": 2.0, "max": 4.0, "runs": 2}


def test_a_run_whose_api_server_did_not_start_leaves_the_other_runs_http_figures() -> None:
    runs = [one_run(100, 100, 50), one_run(100, 100, 50), one_run(200, 100, 50)]
    runs[1]["http"] = {"error": "the API server did not start: port in use"}
    c = bench.combine_runs(runs)
    assert [r["throughput_rps"] for r in c["http"]["http"]] == [75.0]  # median of 50 and 100
    assert c["ratios"]["http"] == [{"clients": 1, "http_vs_client": {"median": 0.5, "min": 0.5, "max": 0.5, "runs": 2}}]
    assert "| 1 | 150 | 75.0 | 0.50 |" in bench._md_concurrency(c)


def test_errors_are_summed_and_the_first_kept() -> None:
    runs = [one_run(100, 100, 50) for _ in range(2)]
    runs[1]["host"] = rows({1: 100, 16: 400}, errors=3)
    c = bench.combine_runs(runs)
    assert c["host"][0]["errors"] == 3 and c["host"][0]["first_error"] == "boom"


def test_runs_that_measured_different_levels_are_refused() -> None:
    other = one_run(100, 100, 50)
    other["host"] = rows({2: 100, 16: 400})
    with pytest.raises(ValueError, match="different levels"):
        bench.combine_runs([one_run(100, 100, 50), other])


def test_one_run_reports_plain_ratios_and_several_their_range() -> None:
    single = bench._md_concurrency(bench.combine_runs([one_run(100, 100, 50)]))
    assert "| 1 | 1.00 | 2.00 | 0.50 | 0.50 | 2.00 |" in single
    assert "Median of" not in single and "(host / pool 0.94)" in single
    several = bench._md_concurrency(bench.combine_runs([one_run(100, 100, 50), one_run(200, 100, 100)]))
    assert several.startswith("Median of 2 runs")
    assert "| 1 | 1.50 (1.00-2.00) | 2.00 | 0.50 | 0.50 | 2.00 |" in several
    assert "| 1 | 150 | 75.0 | 0.50 | 10.0 | 10.0 |" in several  # the HTTP table: rates under 100 with a decimal


def test_runs_option_overrides_the_modes_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    seen: list[bench.Plan] = []
    monkeypatch.setattr(bench, "run", lambda plan, out: seen.append(plan))
    assert bench.main(["--full", "--runs", "2", "--out", str(tmp_path)]) == 0
    assert bench.main(["--full", "--out", str(tmp_path)]) == 0
    assert [p.runs for p in seen] == [2, 3]
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--runs", "0"])


@pytest.mark.parametrize(
    ("module", "repeats"), [("run", "the concurrency section"), ("mixed", "every measurement of each model")]
)
def test_runs_help_says_what_each_benchmark_repeats_and_each_modes_count(
    module: str, repeats: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    benchmark = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--runs N repeat {repeats} N times" in text
    counts = ", ".join(f"{mode} {plan.runs}" for mode, plan in benchmark.PLANS.items())
    assert f"(default: the mode's, {counts})" in text


def test_every_plan_measures_one_model_per_process_only_at_host_levels() -> None:
    # One model per process is measured in turns with the host, level by level: a level the
    # host does not run would silently have no figures.
    for plan in bench.PLANS.values():
        assert set(plan.naive_levels) <= set(plan.levels), plan.mode


def test_paired_blocks_report_medians_of_the_ratios_within_each_block() -> None:
    from benchmarks import paired

    # The machine doubles its speed after two blocks: ratios within a block stay put.
    blocks = [
        {"a": 10.0, "b": 11.0, "naive": 10.0},
        {"a": 10.0, "b": 9.0, "naive": 12.5},
        {"a": 20.0, "b": 22.0, "naive": 20.0},
        {"a": 20.0, "b": 21.0, "naive": 25.0},
    ]
    s = paired.summarize(blocks)
    assert s["blocks"] == 4 and s["b_ahead_in"] == 3
    assert s["b_vs_a"] == pytest.approx((1.05 + 1.1) / 2)
    assert s["a_vs_naive"] == pytest.approx(0.9) and s["b_vs_naive"] == pytest.approx((0.84 + 1.1) / 2)
    assert s["naive_rps"] == pytest.approx(16.25)
    alone = paired.summarize([{"a": x["a"], "b": x["b"]} for x in blocks])  # --no-naive
    assert alone == {"blocks": 4, "b_vs_a": s["b_vs_a"], "b_ahead_in": 3}
    assert paired._settings(["SHM_MODEL_WORKER_SPIN_MS=0", "X=a=b"]) == {"SHM_MODEL_WORKER_SPIN_MS": "0", "X": "a=b"}
    with pytest.raises(SystemExit, match="'oops' is not NAME=VALUE"):
        paired._settings(["oops"])


def test_overhead_takes_turns_and_reports_the_median_of_each_rounds_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    # A scripted clock: each call advances it by its duration. The machine slows down 2x
    # after the first round; the host costs 1.2x, 1.0x and 1.1x in-process in the rounds.
    clock = [0.0]
    order: list[str] = []
    durations = {
        "local": iter([1.0, 1.0, 2.0, 2.0]),  # warm-up, then one call a round
        "host": iter([1.0, 1.2, 2.0, 2.2]),
    }

    def call(name: str) -> None:
        order.append(name)
        clock[0] += next(durations[name])

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    row = bench.alternate(lambda: call("local"), lambda: call("host"), seconds=3.0, rounds=3)
    assert order == ["local", "host"] * 4
    assert row["ratios"] == pytest.approx([1.2, 1.0, 1.1]) and row["ratio"] == pytest.approx(1.1)
    assert row["in_process_ms"] == pytest.approx(2000.0) and row["host_ms"] == pytest.approx(2000.0)
    assert bench._fmt(bench._spread(row["ratios"])) == "1.10 (1.00-1.20)"
