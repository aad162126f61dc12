"""The ``shm-model`` command: serve the model host, and talk to a running one."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from shm_model.errors import ConfigError, ModelLoadError, ShmModelError

EXIT_USAGE = 2


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MB"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _serve(args: argparse.Namespace) -> int:
    from config.model_config import HostConfig, ModelConfig
    from shm_model import logs

    host_cfg, model_cfg = HostConfig.load(), ModelConfig.load()
    logs.setup(host_cfg.log_level, role="supervisor")
    # Before torch is imported: the supervisor must never start a thread pool that a
    # fork would break (workers set their own thread count after fork).
    from shm_model.host import Supervisor, single_threaded

    single_threaded()
    return Supervisor(model_cfg, host_cfg).run()


def _client(args: argparse.Namespace) -> Any:
    from shm_model.client import HostClient

    return HostClient(args.socket, timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2, ensure_ascii=False))
        return 0
    mem = status["memory"]
    print(
        f"model        {status['model']} ({status['device']}, dim {status['dimension']}, "
        f"max {status['max_seq_length']} tokens)"
    )
    print(
        f"supervisor   pid {status['pid']}, up {status['uptime_s']:.0f}s, generation {status['generation']}, "
        f"{status['start_method']} workers x {status['threads_per_worker']} threads ({status.get('cores')} cores)"
    )
    print(
        f"weights      {_mb(status.get('weight_bytes'))}, placement {status['weight_placement']} "
        f"{ {k: _mb(v) for k, v in (status.get('weights') or {}).items()} }"
    )
    print(
        f"queue        {status['in_flight']} in flight / {status['queue_size']}, {status['queue_depth']} pieces waiting"
    )
    for priority, q in (status.get("queue") or {}).items():
        if not isinstance(q, dict) or "wait_ms" not in q:
            continue
        wait = q["wait_ms"]
        print(
            f"  {priority:<11}{q['requests']} requests ({q['texts']} texts) waiting; served {q['served_requests']} "
            f"requests in {q['batches']} batches; wait p50 {_ms(wait['p50'])} p99 {_ms(wait['p99'])}"
        )
    print(f"memory       RSS {_mb(mem['rss'])}  PSS {_mb(mem['pss'])}  USS {_mb(mem['uss'])} (host process tree)")
    health = status.get("health") or {}
    if health:
        reasons = "; ".join((health.get("reasons") or {}).values())
        print(f"health       {health.get('status')}{': ' + reasons if reasons else ''}")
        pressure = status.get("memory_pressure") or {}
        restarts = ", ".join(f"{k} {v}" for k, v in (status.get("restarts") or {}).items())
        print(
            f"             {_mb(pressure.get('headroom'))} free of {_mb(pressure.get('ceiling'))}; restarts: {restarts}"
        )
    print(f"{'pid':>8} {'gen':>4} {'state':<9} {'requests':>9} {'batches':>8} {'RSS':>10} {'PSS':>10} {'USS':>10}")
    for w in status["workers"]:
        print(
            f"{w['pid']:>8} {w['generation']:>4} {w['state']:<9} {w['requests_served']:>9} {w['batches']:>8} "
            f"{_mb(w.get('rss')):>10} {_mb(w.get('pss')):>10} {_mb(w.get('uss')):>10}"
        )
    return 0


def _encode(args: argparse.Namespace) -> int:
    texts = args.text if args.text != ["-"] else [line.rstrip("\n") for line in sys.stdin]
    with _client(args) as client:
        vectors = client.encode(texts, normalize_embeddings=args.normalize, prompt_name=args.prompt_name)
    if args.json:
        json.dump([[float(x) for x in row] for row in vectors], sys.stdout)
        print()
        return 0
    import numpy as np

    for text, row in zip(texts, vectors, strict=True):
        head = " ".join(f"{x:+.4f}" for x in row[:6])
        print(f"dim={row.shape[0]} norm={float(np.linalg.norm(row)):.4f} [{head} ...] {text[:60]!r}")
    return 0


def _reload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.reload(timeout=max(args.timeout or 0, 600.0))
    print(f"reloaded {info['model']}: generation {info['generation']}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.stop()
    print(f"host pid {info['pid']} is stopping")
    return 0


def _api(args: argparse.Namespace) -> int:
    """``shm-model api ARGS`` is ``shm-model-api ARGS``: the HTTP stack is never imported here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "api_server", *args.api_args])


class _SettingsHelp(argparse.RawDescriptionHelpFormatter):
    """Builds the list of environment variables only when --help prints it (it imports pydantic)."""

    MARK = "(settings)"

    def add_text(self, text: str | None) -> None:
        if text == self.MARK:
            from config.settings import settings_help

            text = settings_help()
        super().add_text(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shm-model",
        description="Host one sentence-embedding model for many processes: the weights live "
        "once in shared memory, forked workers encode, clients talk over a Unix socket.",
        epilog=_SettingsHelp.MARK,
        formatter_class=_SettingsHelp,
    )
    parser.add_argument("--socket", help="host socket (default: SHM_MODEL_SOCKET or its default)")
    parser.add_argument("--timeout", type=float, default=None, help="request timeout in seconds")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_text, description=help_text, epilog=_SettingsHelp.MARK, formatter_class=_SettingsHelp,
            **kwargs,
        )  # fmt: skip
        p.set_defaults(func=func)
        return p

    add("serve", _serve, "run the host in the foreground (SIGTERM/SIGINT drain, SIGHUP reloads)")
    p = add("status", _status, "show the running host: model, workers, queue, memory")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")
    p = add("encode", _encode, "embed TEXT arguments (or '-' for one text per stdin line)")
    p.add_argument("text", nargs="+", help="texts to embed, or - to read lines from stdin")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the vectors")
    p.add_argument("--prompt-name", default=None, help="a prompt of the model, e.g. query")
    p.add_argument("--json", action="store_true", help="print the vectors as a JSON array")
    add("reload", _reload, "load the model again and replace the workers without failing requests")
    add("stop", _stop, "stop the host gracefully (in-flight requests finish)")
    add(
        "api",
        _api,
        "run the chat (RAG) API server on the host: runs shm-model-api with the arguments that follow "
        "(see 'shm-model api --help')",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "api":
        args.api_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.socket:
        os.environ["SHM_MODEL_SOCKET"] = args.socket
    try:
        return int(args.func(args))
    except (ConfigError, ModelLoadError) as exc:
        print(f"shm-model: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ShmModelError as exc:
        print(f"shm-model: {exc.code}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
