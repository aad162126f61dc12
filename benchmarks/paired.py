"""Two hosts that differ in their settings, and one model per process, taking turns in short blocks.

    python -m benchmarks.paired --clients 2 --a SHM_MODEL_WORKER_SPIN_MS=0
    python -m benchmarks.paired --model kure --clients 16 --blocks 6 --seconds 20 --no-naive --b SHM_MODEL_DTYPE=int8

Host A runs with the settings given by ``--a``, host B with those given by ``--b`` (each on top
of the defaults); ``--clients`` threads send one-text requests in a closed loop, first to one
system, then the next, in blocks of ``--seconds``, the order reversed every other block. One
model per process (as many processes as clients, the cores shared among them) runs its own
blocks beside them, unless ``--no-naive`` (a large model in many processes would not fit in
memory). On a noisy machine a rate can move by 1.5x within minutes, so the figures are the
medians of the ratios measured within each block: B / A, A / one model per process and B / one
model per process, with how many blocks B beat A in. The summary is printed as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import memory, run
from benchmarks.common import SENTENCES, host, progress
from shm_model.client import HostClient


def summarize(blocks: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Medians of the per-block ratios of req/s (keys ``a``, ``b`` and, if it ran, ``naive``)."""
    b_a = [x["b"] / x["a"] for x in blocks]
    out = {"blocks": len(blocks), "b_vs_a": statistics.median(b_a), "b_ahead_in": sum(r > 1 for r in b_a)}
    if blocks and all("naive" in x for x in blocks):
        out["a_vs_naive"] = statistics.median(x["a"] / x["naive"] for x in blocks)
        out["b_vs_naive"] = statistics.median(x["b"] / x["naive"] for x in blocks)
        out["naive_rps"] = statistics.median(x["naive"] for x in blocks)
    return out


def _settings(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"paired: {pair!r} is not NAME=VALUE")
        out[name] = value
    return out


def measure(
    model: str, clients: int, blocks: int, seconds: float, a: dict[str, str], b: dict[str, str], *, naive: bool = True
) -> list[dict[str, float]]:
    """The req/s of each system in each block."""
    rows: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        hosts = {}
        for name, env in (("a", a), ("b", b)):
            client = HostClient(stack.enter_context(host(model, **env)), timeout=120, pool_size=clients)
            stack.callback(client.close)
            client.encode(list(SENTENCES))
            hosts[name] = client
        procs = []
        if naive:
            procs = stack.enter_context(run._consumers(model, clients, max(1, run._cores() // clients), seconds))

        def rate(tally: run.Tally) -> float:
            return tally.row(clients)["throughput_rps"]

        def hosted(client: HostClient) -> float:
            run._wait_until_others_idle(client)
            return rate(run._drive_tally(clients, seconds, lambda k, i: client.encode([SENTENCES[(k + i) % 6]])))

        for i in range(blocks):
            order = ["a", "b", "naive"][: 3 if naive else 2]
            order = order if i % 2 == 0 else order[::-1]
            row = {name: rate(run._naive_block(procs)) if name == "naive" else hosted(hosts[name]) for name in order}
            rows.append(row)
            progress(f"block {i + 1}/{blocks}: " + ", ".join(f"{k} {v:.1f} req/s" for k, v in row.items()))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled", help="bundled, kure (the KURE-shaped model) or a path")
    parser.add_argument("--clients", type=int, default=1, help="threads sending requests (default 1)")
    parser.add_argument("--blocks", type=int, default=30, help="blocks of each system (default 30)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of a block (default 2)")
    parser.add_argument("--a", nargs="*", default=[], metavar="NAME=VALUE", help="host A's settings")
    parser.add_argument("--b", nargs="*", default=[], metavar="NAME=VALUE", help="host B's settings")
    parser.add_argument("--no-naive", action="store_true", help="the two hosts only, no model per process")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.blocks < 1 or args.seconds <= 0:
        parser.error("--clients and --blocks must be at least 1 and --seconds above 0")
    a, b = _settings(args.a), _settings(args.b)
    model = memory.model_name(args.model)
    rows = measure(model, args.clients, args.blocks, args.seconds, a, b, naive=not args.no_naive)
    summary = {"model": args.model, "clients": args.clients, "a": a, "b": b, **summarize(rows), "per_block": rows}
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
