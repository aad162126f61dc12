#!/usr/bin/env python3
"""Table-aware Korean document processing on the shared model host.

Parses PDF, DOCX, HTML, Markdown, CSV, XLSX and text files, keeps tables as rows that stand
alone (``header: value`` for every cell), embeds chunks through ``ModelManager`` (the shared
host; the fallback follows SHM_MODEL_MODE) and answers queries with dense, BM25 or hybrid
retrieval from one SQLite file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

DEFAULT_DB = os.path.join("data", "rag.sqlite3")

log = logging.getLogger("rag_with_tables")


def build_parser() -> argparse.ArgumentParser:
    from config.settings import LOG_LEVELS, settings_help

    parser = argparse.ArgumentParser(
        prog="rag_with_tables.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "The model comes from ModelManager (SHM_MODEL_MODE, SHM_MODEL_SOCKET, MODEL_NAME; see 'shm-model --help'). "
            "Each file is parsed in a child process under the RAG_* limits.\n"
            "exit status: 0 ok, 1 some files failed or nothing matched, 2 usage, setting or store error.\n\n"
            + settings_help(("rag", "ingest", "logs"))
        ),
    )
    parser.add_argument("--db", default=None, help=f"the store: a SQLite file, or a postgresql:// URL for PostgreSQL "
                        f"with pgvector (default: RAG_DB, else {DEFAULT_DB})")  # fmt: skip
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS, help="default: RAG_LOG_LEVEL")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="add or update files and folders (unchanged files are skipped)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--events", action="store_true", help="print one JSON line per file as it is done, then the report")

    p = sub.add_parser("query", help="top-k chunks for a question, with scores, sources and table rows")
    p.add_argument("question")
    p.add_argument("-k", type=int, default=5, help="how many results (%(default)s)")
    p.add_argument("--mode", choices=("hybrid", "dense", "bm25"), default="hybrid")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stats", help="documents, tables and chunks in the store, and its model")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("reindex", help="re-embed every chunk with the current model")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("samples", help="write the sample Korean corpus (one file per format) to a folder")
    p.add_argument("folder")
    p.add_argument("--questions", metavar="FILE", help="also write the sample questions as JSON to FILE")

    p = sub.add_parser(
        "collection", help="write the evaluation collection (29 look-alike office files in 7 formats) to a folder"
    )
    p.add_argument("folder")
    p.add_argument("--questions", metavar="FILE", help="also write its labelled questions as JSON to FILE")

    p = sub.add_parser(
        "evaluate",
        help="hit@1, recall@k, MRR, answer accuracy and no-answer rate by retrieval mode and question kind",
        description="Ask every question of a set and report, per retrieval mode and per kind of question: "
        "hit@1, recall@k and MRR of the passage that answers it, the share of answers that contain the expected "
        "value, the share of answerable questions declined, and the share of unanswerable ones declined.",
    )
    p.add_argument(
        "--questions",
        help="JSON list of {question, file, contains, answer, kind} (no file: unanswerable); "
        "default: the sample questions",
    )
    p.add_argument("--collection", action="store_true", help="the evaluation collection's questions (ingest it first)")
    p.add_argument(
        "--api", metavar="URL", help="ask a running API server (/search, /chat; API_KEY) instead of the store"
    )
    p.add_argument("--mode", action="append", choices=("hybrid", "dense", "bm25"), help="only this mode (repeatable)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from config.errors import ConfigError
    from config.rag_config import RagConfig
    from shm_model.logs import setup

    try:
        config = RagConfig.load()
        setup(args.log_level or config.log_level, role="rag")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.db = args.db or config.db
    if args.command in ("samples", "collection"):
        from tablerag import collection, samples

        module: Any = samples if args.command == "samples" else collection
        return _write_files(module.write_corpus if module is samples else module.write_collection, module, args)
    if args.command == "evaluate" and args.api:
        return _evaluate(None, None, args)
    if getattr(args, "k", 1) < 1:
        print("error: -k must be >= 1", file=sys.stderr)
        return 2

    from shm_model import ModelManager
    from shm_model.errors import ShmModelError
    from tablerag.limits import IngestLimits
    from tablerag.store import StoreError, open_store

    try:
        args.limits = IngestLimits.load()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        store = open_store(args.db)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "stats":
            return _stats(store, args)
        model = ModelManager.get_instance().get_model()
        return COMMANDS[args.command](store, model, args)
    except (StoreError, ShmModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # each file is its own transaction: what is done stays done
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        store.close()


def _write_files(write: Any, module: Any, args: argparse.Namespace) -> int:
    """Write a generated corpus (and its questions) to the folder named, listing the files."""
    from pathlib import Path

    try:
        paths = write(Path(args.folder))
    except RuntimeError as exc:  # no Korean font for the PDFs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    if args.questions:
        module.write_questions(Path(args.questions))
        print(args.questions)
    return 0


def _ingest(store: Any, model: Any, args: argparse.Namespace) -> int:
    from tablerag.ingest import Ingestor

    def event(item: dict[str, Any]) -> None:
        print(json.dumps(item, ensure_ascii=False), flush=True)

    report = Ingestor(store, model, args.limits).ingest(
        args.paths,
        progress=not args.no_progress and not args.events and sys.stderr.isatty(),
        on_file=event if args.events else None,
    )
    if args.json or args.events:
        print(json.dumps({"event": "report", **report.to_dict()}, ensure_ascii=False))
    else:
        for path, reason in report.failed:
            print(f"failed: {path}: {reason}", file=sys.stderr)
        print(
            f"{len(report.added)} added, {len(report.replaced)} replaced, {len(report.unchanged)} unchanged, "
            f"{len(report.failed)} failed; {report.chunks} chunks in {report.seconds:.1f}s"
        )
    return 1 if report.failed else 0


def _query(store: Any, model: Any, args: argparse.Namespace) -> int:
    from tablerag.chunking import location_label
    from tablerag.retrieval import Retriever

    retriever = Retriever(store, model)
    retriever.check_model()
    hits = retriever.search(args.question, k=args.k, mode=args.mode)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=1))
        return 0 if hits else 1
    for rank, hit in enumerate(hits, start=1):
        where = location_label(hit.location)
        print(f"{rank}. [{hit.score:.4f}] {os.path.basename(hit.path)}{' (' + where + ')' if where else ''} {hit.kind}")
        if hit.row:
            if hit.table_caption:
                print(f"   {hit.table_caption}")
            print("   " + " | ".join(f"{h}: {v}" for h, v in hit.row.items()))
        else:
            print("   " + hit.text.replace("\n", "\n   "))
    if not hits:
        print("no results", file=sys.stderr)
    return 0 if hits else 1


def _stats(store: Any, args: argparse.Namespace) -> int:
    stats = store.stats()
    if args.json:
        print(json.dumps(stats | {"documents_list": store.documents()}, ensure_ascii=False, indent=1))
    else:
        for key, value in stats.items():
            print(f"{key}: {value}")
    return 0


def _reindex(store: Any, model: Any, args: argparse.Namespace) -> int:
    from tablerag.ingest import Ingestor

    ingestor = Ingestor(store, model)
    n = ingestor.reindex(progress=not args.no_progress and sys.stderr.isatty())
    print(f"re-embedded {n} chunks with {ingestor.model_name} (dimension {ingestor.dimension})")
    return 0


def _evaluate(store: Any, model: Any, args: argparse.Namespace) -> int:
    from tablerag import collection
    from tablerag.evaluate import ApiBackend, Backend, StoreBackend, evaluate, load_questions, table
    from tablerag.retrieval import MODES, Retriever

    backend: Backend
    if args.api:
        backend = ApiBackend(args.api, key=os.environ.get("API_KEY", ""))
        source = args.api
    else:
        retriever = Retriever(store, model)
        retriever.check_model()
        backend = StoreBackend(retriever)
        source = (store.model() or (None,))[0]
    try:
        questions = collection.questions() if args.collection else load_questions(args.questions)
        result = evaluate(backend, questions, k=args.k, modes=args.mode or MODES)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # a bad questions file, a failing API
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["source"] = source
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return 0
    print(f"{source}: {result['questions']} questions")
    print(table(result))
    return 0


COMMANDS = {"ingest": _ingest, "query": _query, "reindex": _reindex, "evaluate": _evaluate}

if __name__ == "__main__":
    sys.exit(main())
