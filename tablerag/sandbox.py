"""Each file parsed in a child process under a memory limit and a time limit.

The ingesting process never forks. It may hold a torch model (``SHM_MODEL_MODE=auto`` or
``local`` loads one in-process) whose thread pools and locks a forked child would inherit
in an unknown state, and it may load one at any time, so "fork before torch" cannot be
promised. Instead ``ParseBox`` starts one parser server with ``subprocess`` (fork and exec
at once: a fresh interpreter, safe whatever the parent holds) that imports the parser
libraries once, single-threaded, and then forks one child per file:

* the child sets ``RLIMIT_AS`` to what it already maps plus ``RAG_MAX_MEMORY_MB`` (so a
  parse that would take gigabytes gets ``MemoryError`` instead), ``RLIMIT_CPU`` to
  ``RAG_FILE_TIMEOUT`` and no core dumps, parses, and writes the blocks to a pipe as one
  JSON document;
* the server reads that pipe with a wall-clock deadline of ``RAG_FILE_TIMEOUT`` and a
  bound on its size, kills the child at the deadline, reaps it, and answers with one JSON
  line: the blocks, or one line naming the limit or the reason.

Forking the warm server costs about a millisecond a file; the server costs one
interpreter start per ingestion. Nothing crosses a pipe pickled: blocks are JSON and the
ingesting side checks their shape (``Block.from_dict``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from tablerag.documents import Block, ParseError, parse
from tablerag.limits import IngestLimits

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
#: Bytes of JSON per character a child may send (UTF-8 and escapes), plus room for structure.
REPLY_BYTES_PER_CHAR = 8
REPLY_SLACK = 1 << 20
#: How long the ingesting side waits past the server's own deadline before it gives up on it.
SERVER_GRACE = 30.0


def reply_limit(limits: IngestLimits) -> int:
    return REPLY_BYTES_PER_CHAR * limits.max_document_chars + REPLY_SLACK


class ParseBox:
    """The ingesting side: one parser server, started on first use and ended by ``close()``."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self.peak_rss = 0  # bytes: the largest peak RSS of a parse child so far
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ParseBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def parse(self, path: Path) -> list[Block]:
        """The file's blocks, parsed in a child under the limits; ``ParseError`` otherwise."""
        proc = self._server()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"path": str(path)}).encode() + b"\n")
            proc.stdin.flush()
            line = _read_line(proc.stdout, self.limits.file_timeout + SERVER_GRACE, reply_limit(self.limits))
        except (OSError, ParseError) as exc:
            self.close()
            raise ParseError(f"the parser process failed: {exc}") from exc
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict):
                raise ValueError("expected an object")
            peak = reply.get("peak_rss")
            if isinstance(peak, int):
                self.peak_rss = max(self.peak_rss, peak)
            if not reply.get("ok"):
                raise ParseError(str(reply.get("error") or "the parser gave no reason"))
            blocks = reply.get("blocks")
            if not isinstance(blocks, list):
                raise ValueError("expected a list of blocks")
            return [Block.from_dict(b) for b in blocks]
        except ValueError as exc:
            self.close()
            raise ParseError(f"the parser process sent a malformed reply: {exc}") from exc

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()  # EOF on stdin: the server exits
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _server(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tablerag.sandbox", json.dumps(self.limits.as_dict())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        return self._proc


def _read_line(stream: IO[bytes], timeout: float, limit: int) -> bytes:
    """One line from ``stream`` within ``timeout`` seconds and ``limit`` bytes."""
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    data = bytearray()
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise ParseError(f"no answer within {timeout:g} s")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise ParseError("it exited")
        data += chunk
        if len(data) > limit:
            raise ParseError(f"its answer is over {limit:,} bytes")
    return bytes(data)


# --- the parser server -------------------------------------------------------------------


def serve(limits: IngestLimits, requests: IO[bytes], replies: IO[bytes]) -> None:
    """Answer one JSON line per request line until EOF."""
    for line in requests:
        try:
            path = json.loads(line)["path"]
            if not isinstance(path, str):
                raise TypeError("path")
        except (ValueError, KeyError, TypeError):
            reply: dict[str, Any] = {"ok": False, "error": "malformed request"}
        else:
            reply = parse_in_child(Path(path), limits)
        replies.write(json.dumps(reply, ensure_ascii=False).encode() + b"\n")
        replies.flush()


def parse_in_child(path: Path, limits: IngestLimits) -> dict[str, Any]:
    """Fork a child that parses ``path`` under the limits; its reply, or why there is none."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        code = 70
        try:
            _child(path, limits, write_end)
            code = 0
        finally:
            os._exit(code)  # never back into the server's loop
    os.close(write_end)
    data = bytearray()
    failure = None
    deadline = time.monotonic() + limits.file_timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                failure = f"parsing took longer than {limits.file_timeout:g} s (RAG_FILE_TIMEOUT)"
                break
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                break
            data += chunk
            if len(data) > reply_limit(limits):
                failure = f"the parser's answer is over {reply_limit(limits):,} bytes (RAG_MAX_DOCUMENT_CHARS)"
                break
    finally:
        os.close(read_end)
        if failure is not None:
            os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
    log.debug("%s: parsed in %.2f s of CPU, peak RSS %d KB", path, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
    if failure is None and os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == signal.SIGXCPU:
            failure = f"parsing took more than {limits.file_timeout:g} s of CPU time (RAG_FILE_TIMEOUT)"
        else:
            failure = f"the parser process was killed by {signal.Signals(number).name}"
    peak = {"peak_rss": usage.ru_maxrss * 1024}
    if failure is None:
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if isinstance(reply, dict):
            return reply | peak
        failure = f"the parser process exited with status {os.waitstatus_to_exitcode(status)} without an answer"
    return {"ok": False, "error": failure} | peak


def _child(path: Path, limits: IngestLimits, fd: int) -> None:
    timeout = math.ceil(limits.file_timeout)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (timeout, timeout + 1))
    ceiling = _mapped_bytes() + (limits.max_memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))
    out_of_memory = False
    try:
        reply: dict[str, Any] = {"ok": True, "blocks": [b.to_dict() for b in parse(path, limits)]}
        data = json.dumps(reply, ensure_ascii=False).encode()
    except MemoryError:
        out_of_memory = True  # handled below, once the parse's frames are gone
    except ParseError as exc:
        data = json.dumps({"ok": False, "error": str(exc)}, ensure_ascii=False).encode()
    if out_of_memory:
        error = f"parsing needs more than {limits.max_memory_mb:,} MB of memory (RAG_MAX_MEMORY_MB)"
        data = json.dumps({"ok": False, "error": error}).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _mapped_bytes() -> int:
    """This process's virtual size (``VmSize``): ``RLIMIT_AS`` counts all of it."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")  # Linux always has it: this is a bug


def _preload() -> None:
    """Import every parser library before the first fork, so each child starts warm."""
    import bs4  # noqa: F401
    import docx  # noqa: F401
    import openpyxl  # noqa: F401
    import pdfplumber  # noqa: F401


def main(argv: list[str]) -> int:
    limits = IngestLimits(**json.loads(argv[0]))
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a library's print() must not break the replies
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _preload()
    try:
        serve(limits, sys.stdin.buffer, replies)
    except (BrokenPipeError, KeyboardInterrupt):  # the ingesting process went away, or was interrupted
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
