"""Ingestion jobs: uploaded files ingested by ``rag_with_tables.py ingest --events`` subprocesses
that use the host, a bounded queue read by a fixed pool of runner threads, each job in its own
process group and killed past its time limit."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.api_config import ApiConfig
from shm_model import errors

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
#: Finished ingestion jobs remembered for GET /documents/jobs/{id}.
MAX_JOBS = 1000
#: An uploaded file's name is cut to this many UTF-8 bytes, its suffix kept (NAME_MAX is 255).
MAX_NAME_BYTES = 200
#: A job's message and each file's error are cut to this many characters.
MAX_MESSAGE_CHARS = 300
#: Environment variables kept from the ingestion subprocess.
SECRET_ENV = ("CHAT_API_KEY", "API_KEY")


@dataclass
class Job:
    id: str
    files: list[str]
    folder: str = ""
    names: dict[str, str] = field(default_factory=dict)  # stored path -> the uploader's name
    state: str = "queued"  # queued | running | done | failed
    done: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    chunks: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    message: str = ""

    def name(self, path: str) -> str:
        return self.names.get(os.path.realpath(path), os.path.basename(path))

    def to_dict(self) -> dict[str, Any]:
        total = len(self.files)
        return {
            "id": self.id,
            "state": self.state,
            "files": total,
            "processed": len(self.done) + len(self.errors),
            "progress": round((len(self.done) + len(self.errors)) / total, 3) if total else 1.0,
            "chunks": self.chunks,
            "errors": self.errors,
            "started": self.started,
            "finished": self.finished,
            "message": self.message,
        }


class Jobs:
    """Ingestion subprocesses (``rag_with_tables.py ingest --events``): a bounded queue read by a
    fixed pool of ``job_workers`` runner threads; each job runs in its own process group, killed
    past ``job_timeout``. Queued jobs are bounded by the queue, finished ones by ``MAX_JOBS``."""

    def __init__(self, settings: ApiConfig) -> None:
        self.settings = settings
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=settings.job_queue)
        self._procs: dict[int, subprocess.Popen[str]] = {}
        self._stopping = threading.Event()
        self._runners = [
            threading.Thread(target=self._runner, name=f"ingest-{n}", daemon=True) for n in range(settings.job_workers)
        ]
        for runner in self._runners:
            runner.start()

    def check_room(self) -> None:
        """Overloaded (429) when the queue is full, before an upload is stored."""
        if self._queue.full():
            raise errors.Overloaded(f"{self.settings.job_queue} ingestion jobs are waiting; retry later")

    def submit(self, files: list[str], *, folder: str = "", names: dict[str, str] | None = None) -> Job:
        job = Job(uuid.uuid4().hex[:12], files, folder=folder, names=names or {})
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise errors.Overloaded(f"{self.settings.job_queue} ingestion jobs are waiting; retry later") from None
            finished = [j.id for j in self.jobs.values() if j.finished is not None]
            for old in finished[: max(0, len(self.jobs) - MAX_JOBS + 1)]:
                del self.jobs[old]  # the oldest finished jobs make room
            self.jobs[job.id] = job
        return job

    def _runner(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                if self._stopping.is_set():
                    job.state, job.message = "failed", "the server stopped before the job ran"
                else:
                    self._run(job)
            except Exception as exc:  # a runner must survive any one job
                log.exception("ingestion job %s", job.id)
                job.state, job.message = "failed", f"internal error: {type(exc).__name__}"
            finally:
                job.finished = job.finished or time.time()
                if job.folder and not self.settings.keep_uploads:
                    shutil.rmtree(job.folder, ignore_errors=True)

    def _run(self, job: Job) -> None:
        job.state = "running"
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env["RAG_DB"] = self.settings.db
        cmd = [sys.executable, str(ROOT / "rag_with_tables.py"), "ingest", "--events", *job.files]
        with tempfile.TemporaryFile(mode="w+") as errors_file:  # a pipe could fill up and stall the child
            try:
                proc = subprocess.Popen(
                    cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors_file, text=True,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                job.state, job.message, job.finished = "failed", f"cannot start the ingestion: {exc}", time.time()
                return
            timed_out = threading.Event()

            def kill() -> None:
                timed_out.set()
                _kill_group(proc)

            timer = threading.Timer(self.settings.job_timeout, kill)
            timer.daemon = True
            with self._lock:
                self._procs[proc.pid] = proc
            if self._stopping.is_set():
                _kill_group(proc)
            timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    self._event(job, line)
                code = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:  # only when this thread was interrupted
                    _kill_group(proc)
                    proc.wait()
                self._procs.pop(proc.pid, None)
                if proc.stdout is not None:
                    proc.stdout.close()
            errors_file.seek(0)
            stderr = errors_file.read(64 << 10)
        job.finished = time.time()
        if timed_out.is_set():
            job.state = "failed"
            job.message = f"stopped after API_JOB_TIMEOUT={self.settings.job_timeout:g}s"
        elif code in (0, 1):
            job.state = "done"
            job.message = "some files failed" if job.errors else "ok"
        else:
            job.state = "failed"
            job.message = (stderr.strip().splitlines() or [f"exit status {code}"])[-1][:MAX_MESSAGE_CHARS]

    @staticmethod
    def _event(job: Job, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        if not isinstance(event, dict) or event.get("event") != "file":
            return
        name = job.name(str(event.get("path", "")))
        if event.get("error"):
            job.errors[name] = str(event["error"])[:MAX_MESSAGE_CHARS]
        else:
            job.done.append(name)
            job.chunks += int(event.get("chunks", 0))

    def stop(self) -> None:
        """Kill the running jobs' process groups, drop the queued jobs, end the runners."""
        self._stopping.set()
        with suppress(queue.Empty):
            while True:
                job = self._queue.get_nowait()
                if job is not None:
                    job.state, job.message, job.finished = (
                        "failed",
                        "the server stopped before the job ran",
                        time.time(),
                    )
                    if job.folder and not self.settings.keep_uploads:
                        shutil.rmtree(job.folder, ignore_errors=True)
        for _ in self._runners:
            with suppress(queue.Full):
                self._queue.put_nowait(None)
        with self._lock:
            running = list(self._procs.values())
        for proc in running:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def short_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name`` cut to ``limit`` UTF-8 bytes on a character boundary, its suffix kept."""
    if len(name.encode()) <= limit:
        return name
    stem, suffix = os.path.splitext(name)
    if len(suffix.encode()) > limit // 4:
        stem, suffix = name, ""
    room = limit - len(suffix.encode())
    return stem.encode()[:room].decode("utf-8", "ignore") + suffix


def safe_name(name: str) -> str:
    """An uploaded file's name without its folders and control characters, cut to ``MAX_NAME_BYTES``."""
    base = os.path.basename(name.replace("\\", "/")).strip()
    base = re.sub(r"[\x00-\x1f\x7f]", "", base)
    if not base or base in (".", ".."):
        raise errors.BadRequest("an uploaded file has no usable name")
    return short_name(base)
