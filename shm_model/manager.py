"""``ModelManager``: the one way the chat API server and the document processor get the model.

One feature flag, ``SHM_MODEL_MODE``, decides where vectors come from, so that a
deployment can migrate and roll back without code changes:

* ``shared`` - the model host only (``shm-model serve``); no host is an error;
* ``local``  - a SentenceTransformer loaded once in this process (the rollback switch);
* ``auto``   - the host, and a local model whenever no host answers.

``get_model()`` returns a ``ManagedModel`` with ``SentenceTransformer.encode``'s interface
that routes each call by that flag. The manager never imports torch unless it loads a
local model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from config.model_config import HostConfig, ManagerConfig, ModelConfig
from shm_model import metrics
from shm_model.client import HostClient, check_socket_directory, trusted_uid_set, wait_for_host
from shm_model.errors import (
    BadRequest,
    HostUnavailable,
    ModelLoadError,
    ModelNotFound,
    PermissionDenied,
    RequestTimeout,
    ShmModelError,
)
from shm_model.memory import process_memory
from shm_model.pressure import DEGRADED_KINDS
from shm_model.protocol import too_long

log = logging.getLogger(__name__)

HOST_PROBE_TIMEOUT = 2.0
QUANTILES = {"p50": "0.5", "p99": "0.99"}


@dataclass
class ModelStatus:
    """The seed's ``ModelStatus``, plus where the model runs."""

    is_loaded: bool
    model_name: str
    load_time: float
    memory_usage: int  # MB: PSS of the host's processes (shared) or of this process (local)
    device: str
    error_message: str | None = None  # why it is not loaded, or why the last reload failed
    mode: str = "none"  # the path that serves: shared, local or none
    worker_count: int = 0
    host_pid: int | None = None
    dimension: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _hybridmethod:
    """A method that, called on the class, runs on the singleton (``ModelManager.get_model()``)."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __get__(self, obj: ModelManager | None, cls: type[ModelManager]) -> Callable[..., Any]:
        return functools.partial(self.func, obj if obj is not None else cls.get_instance())


class _Load:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: ShmModelError | None = None


class ManagedModel:
    """An encoder with ``SentenceTransformer.encode``'s interface, served as the flag says."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    @property
    def path(self) -> str:
        """Where the last call went: shared, local or none."""
        return self._manager._path

    def encode(self, sentences: Any, **kwargs: Any) -> Any:
        return self._manager._call("encode", sentences, **kwargs)

    def get_sentence_embedding_dimension(self) -> int:
        return int(self._manager._call("dimension"))

    get_embedding_dimension = get_sentence_embedding_dimension

    def describe(self) -> dict[str, Any]:
        """The model's name, path, dimension, max_seq_length, device and prompts."""
        return dict(self._manager._call("describe"))

    def __getattr__(self, name: str) -> Any:
        local = self._manager._local
        if local is not None and not name.startswith("_"):
            return getattr(local.model, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (served: {self.path})")


class ModelManager:
    """Thread-safe singleton that gives this process the model (``get_instance()``)."""

    _instance: ClassVar[ModelManager | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        model_config: ModelConfig | None = None,
        config: ManagerConfig | None = None,
        host_config: HostConfig | None = None,
    ) -> None:
        self.model_config = model_config or ModelConfig.load()
        self.config = config or ManagerConfig.load()
        self.host_config = host_config or HostConfig.load()
        self._client = HostClient(
            self.host_config.socket_path,
            timeout=self.host_config.request_timeout,
            trusted_uids=self.host_config.trusted_uids,
        )
        self._lock = threading.Lock()
        self._local: Any | None = None  # a workers.backends.SentenceTransformerBackend
        self._load: _Load | None = None
        self._error_message: str | None = None
        self._path = "none"
        self._started_host: subprocess.Popen[bytes] | None = None
        self._model = ManagedModel(self)
        self._make_backend: Callable[[ModelConfig], Any] = _load_local_backend

    # --- singleton ----------------------------------------------------------------------

    @classmethod
    def get_instance(cls) -> ModelManager:
        instance = cls._instance
        if instance is None:
            with cls._instance_lock:
                if cls._instance is None:
                    cls._instance = cls()
                instance = cls._instance
        return instance

    @classmethod
    def reset_instance(cls) -> None:
        """Forget the singleton (its host connections are closed); the next call builds a new one."""
        with cls._instance_lock:
            instance, cls._instance = cls._instance, None
        if instance is not None:
            instance.close()

    def close(self) -> None:
        self._client.close()

    # --- the seed's API ---------------------------------------------------------------

    @_hybridmethod
    def get_model(self) -> ManagedModel:
        """The model, ready to encode; raises the typed error that keeps it from being so."""
        mode = self.config.mode
        if mode == "local":
            self._ensure_local()
        elif mode == "shared":
            self._ensure_host()
        else:
            try:
                self._ensure_host()
            except HostUnavailable as exc:
                log.warning("no model host answers (%s); loading the model in this process", exc)
                self._ensure_local()
        return self._model

    def is_model_loaded(self) -> bool:
        if self.config.mode != "local" and self._host_answers():
            return True
        return self.config.mode != "shared" and self._local is not None

    def reload_model(self) -> bool:
        """Load the model again where it is served; False (with ``error_message``) if that fails."""
        try:
            if self.config.mode != "local" and self._host_answers():
                self._client.reload()
            elif self.config.mode == "shared":
                raise HostUnavailable(f"no model host answers on {self._client.socket_path}")
            else:
                backend = self._load_backend()
                with self._lock:
                    self._local = backend
            self._error_message = None
            log.info("model reloaded")
            return True
        except ShmModelError as exc:
            metrics.ERRORS.labels(type=exc.code).inc()
            self._error_message = str(exc)
            log.error("model reload failed: %s", exc)
            return False

    def get_status(self) -> ModelStatus:
        if self.config.mode != "local":
            try:
                host = self._client.status(timeout=HOST_PROBE_TIMEOUT)
            except ShmModelError as exc:
                if self.config.mode == "shared" or self._local is None:
                    return self._not_loaded(self._error_message or str(exc))
            else:
                return self._host_status(host)
        if self._local is not None:
            return self._local_status()
        return self._not_loaded(self._error_message)

    def host_status(self) -> dict[str, Any] | None:
        """The host's own status (workers, queue, memory), or None when no host answers.
        Also refreshes the host gauges of ``shm_model.metrics``."""
        if self.config.mode == "local":
            return None
        try:
            host = self._client.status(timeout=HOST_PROBE_TIMEOUT)
        except ShmModelError:
            metrics.HOST_UP.set(0)
            return None
        self._host_status(host)
        return host

    def local_model(self) -> Any:
        """The SentenceTransformer loaded in this process (loading it on first use)."""
        return self._ensure_local().model

    # --- routing ----------------------------------------------------------------------

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        mode = self.config.mode
        started = time.perf_counter()
        path = "local" if mode == "local" else "shared"
        try:
            if path == "shared":
                try:
                    result = self._shared(op, *args, **kwargs)
                except HostUnavailable:
                    if mode == "shared":
                        raise
                    path = "local"
                    metrics.FALLBACKS.inc()
                    if self._path != "local":
                        log.warning("the model host went away; serving from a model in this process")
            if path == "local":
                result = self._local_call(op, *args, **kwargs)
        except ShmModelError as exc:
            metrics.ERRORS.labels(type=exc.code).inc()
            raise
        self._path = path
        metrics.REQUESTS.labels(op=op, path=path).inc()
        metrics.LATENCY.labels(op=op, path=path).observe(time.perf_counter() - started)
        return result

    def _shared(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if op == "encode":
            return self._client.encode(*args, **kwargs)
        if op == "describe":
            return self._client.info()
        return self._client.get_sentence_embedding_dimension()

    def _local_call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        backend = self._ensure_local()
        if op == "describe":
            return backend.describe()
        if op != "encode":
            return backend.dimension
        kwargs.pop("timeout", None)
        kwargs.pop("priority", None)  # one process, one model: nothing to order
        model = kwargs.pop("model", None)
        if model is not None and model not in (backend.name, self.model_config.names[0]):
            raise ModelNotFound(
                f"model {model!r:.200} is not loaded in this process (only {backend.name}: the local fallback "
                "serves the first model of MODEL_NAME)",
                model=model,
            )
        truncate = kwargs.pop("truncate", True)
        return_usage = kwargs.pop("return_usage", False)
        (sentences,) = args  # ``encode`` passes them positionally
        truncate_dim = kwargs.get("truncate_dim")
        if truncate_dim is not None and not 1 <= truncate_dim <= backend.dimension:
            raise BadRequest(
                f"truncate_dim={truncate_dim} is not between 1 and the model's dimension {backend.dimension}",
                truncate_dim=truncate_dim,
                dimension=backend.dimension,
            )
        tokens = 0
        if not truncate or return_usage:
            texts = [sentences] if isinstance(sentences, str) else list(sentences)
            prompt = kwargs.get("prompt")
            if prompt is None and kwargs.get("prompt_name") is not None:
                prompt = backend.prompts.get(kwargs["prompt_name"])
            limit = backend.max_seq_length
            counts = backend.count_tokens(texts, prompt) if texts else []
            over = [(i, n) for i, n in enumerate(counts) if n > limit]
            if over and not truncate:
                raise too_long(*over[0], limit)
            tokens = sum(min(n, limit) for n in counts)
        if (
            isinstance(sentences, list | tuple)
            and not sentences
            and not kwargs.get("convert_to_tensor")
            and kwargs.get("convert_to_numpy", True)
        ):
            vectors: Any = np.empty((0, truncate_dim or backend.dimension), dtype=np.float32)  # the host's shape
        else:
            vectors = backend.model.encode(sentences, **kwargs)
        return (vectors, tokens) if return_usage else vectors

    def _host_answers(self) -> bool:
        try:
            self._client.ping(timeout=HOST_PROBE_TIMEOUT)
            return True
        except ShmModelError:
            return False

    def _ensure_host(self) -> None:
        try:
            self._client.ping(timeout=HOST_PROBE_TIMEOUT)
        except HostUnavailable:
            if not self.config.autostart:
                raise
            self._start_host()
        self._path = "shared"

    # --- local model ----------------------------------------------------------------------

    def _ensure_local(self) -> Any:
        """Load the local model once; concurrent callers wait for that load (with a timeout)."""
        backend = self._local
        if backend is not None:
            return backend
        with self._lock:
            if self._local is not None:
                return self._local
            load, owner = (self._load, False) if self._load is not None else (_Load(), True)
            self._load = load
        if owner:
            try:
                backend = self._load_backend()
                with self._lock:
                    self._local = backend
                self._error_message = None
                return backend
            except ShmModelError as exc:
                load.error = exc
                self._error_message = str(exc)
                raise
            finally:
                with self._lock:
                    self._load = None
                load.done.set()
        if not load.done.wait(self.config.load_timeout):
            raise RequestTimeout(
                f"waited {self.config.load_timeout:g}s for the model load another thread started",
                timeout=self.config.load_timeout,
            )
        if load.error is not None:
            raise type(load.error)(load.error.message, **load.error.details)
        assert self._local is not None
        return self._local

    def _load_backend(self) -> Any:
        cfg = self.model_config.first()  # the local fallback serves the default model
        try:
            backend = self._make_backend(cfg)
        except ShmModelError as exc:
            if cfg.device != "auto" or not _is_cuda_oom(exc):
                raise
            log.warning("out of GPU memory loading %s; loading it on the CPU instead", cfg.name)
            backend = self._make_backend(dataclasses.replace(cfg, device="cpu"))
        except Exception as exc:
            raise ModelLoadError(f"model {cfg.name!r} failed to load: {type(exc).__name__}: {exc}") from exc
        metrics.LOAD_SECONDS.labels(path="local").set(backend.load_seconds)
        log.info("loaded %s in this process on %s in %.2fs", cfg.name, backend.device, backend.load_seconds)
        return backend

    # --- starting a host on demand -------------------------------------------------------

    def _start_host(self) -> None:
        """Start ``shm-model serve`` unless another process does; one host per socket."""
        socket_path = self._client.socket_path
        directory = os.path.dirname(socket_path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # The host will run as this user: its directory must be this user's alone.
        check_socket_directory(directory, trusted_uid_set(), socket_path)
        fd = _open_private(socket_path + ".start", os.O_RDWR)
        try:
            deadline = time.monotonic() + self.config.load_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise HostUnavailable("timed out waiting for another process to start the host") from None
                    time.sleep(0.05)
            if self._host_answers():
                return  # another process started it while this one waited
            log_path = os.path.join(directory, "host.log")
            log.info("starting a model host on %s (log: %s)", socket_path, log_path)
            with os.fdopen(_open_private(log_path, os.O_WRONLY | os.O_APPEND), "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "shm_model", "serve"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, "SHM_MODEL_SOCKET": socket_path},
                )
            self._started_host = proc
            try:
                wait_for_host(socket_path, timeout=max(1.0, deadline - time.monotonic()), process=proc)
            except HostUnavailable as exc:
                raise HostUnavailable(f"{exc}; see {log_path}") from None
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # --- status ---------------------------------------------------------------------------

    def _host_status(self, host: dict[str, Any]) -> ModelStatus:
        memory = host.get("memory") or {}
        for kind in ("rss", "pss", "uss"):
            metrics.MEMORY_BYTES.labels(scope="host", kind=kind).set(memory.get(kind, 0))
        metrics.HOST_WORKERS.set(len(host.get("workers") or ()))
        metrics.HOST_QUEUE_DEPTH.set(host.get("in_flight", 0))
        for priority, queue in (host.get("queue") or {}).items():
            if isinstance(queue, dict) and "wait_ms" in queue:
                metrics.HOST_QUEUE_WAITING.labels(priority=priority).set(queue["requests"])
                for quantile in ("p50", "p99"):
                    value = queue["wait_ms"][quantile]
                    if value is not None:
                        metrics.HOST_QUEUE_WAIT_SECONDS.labels(priority=priority, quantile=QUANTILES[quantile]).set(
                            value / 1000.0
                        )
        metrics.LOAD_SECONDS.labels(path="shared").set(host.get("load_seconds") or 0.0)
        metrics.HOST_UP.set(1)
        reasons = (host.get("health") or {}).get("reasons") or {}
        for kind in DEGRADED_KINDS:
            metrics.HOST_DEGRADED.labels(reason=kind).set(1 if kind in reasons else 0)
        pressure = host.get("memory_pressure") or {}
        metrics.HOST_MEMORY_HEADROOM.set(pressure.get("headroom") or 0)
        metrics.HOST_MEMORY_CEILING.set(pressure.get("ceiling") or 0)
        metrics.HOST_MEMORY_PSI.set(pressure.get("psi_some_avg10") or 0.0)
        metrics.HOST_RESTARTS.counts = {k: int(v) for k, v in (host.get("restarts") or {}).items()}
        return ModelStatus(
            is_loaded=True,
            model_name=str(host.get("model")),
            load_time=float(host.get("load_seconds") or 0.0),
            memory_usage=int(memory.get("pss", 0) // 2**20),
            device=str(host.get("device")),
            error_message=self._error_message,
            mode="shared",
            worker_count=len(host.get("workers") or ()),
            host_pid=host.get("pid"),
            dimension=host.get("dimension"),
        )

    def _local_status(self) -> ModelStatus:
        backend = self._local
        assert backend is not None
        figures = process_memory(os.getpid()) or {"rss": 0, "pss": 0, "uss": 0}
        for kind, value in figures.items():
            metrics.MEMORY_BYTES.labels(scope="process", kind=kind).set(value)
        return ModelStatus(
            is_loaded=True,
            model_name=self.model_config.name,
            load_time=float(backend.load_seconds),
            memory_usage=int(figures["pss"] // 2**20),
            device=str(backend.device),
            error_message=self._error_message,
            mode="local",
            dimension=backend.dimension,
        )

    def _not_loaded(self, error: str | None) -> ModelStatus:
        return ModelStatus(
            is_loaded=False,
            model_name=self.model_config.name,
            load_time=0.0,
            memory_usage=0,
            device=self.model_config.device,
            error_message=error,
        )


def _open_private(path: str, flags: int) -> int:
    """Open or create a regular file of this user's, mode 0600, refusing a symlink (O_NOFOLLOW) or
    anything but a regular file in its place."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise PermissionDenied(f"{path} is a symlink; refusing to open it (remove it)", path=path) from None
        raise HostUnavailable(f"cannot open {path}: {exc.strerror}", path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise PermissionDenied(
            f"{path} is not a regular file of this user (uid {st.st_uid}); refusing to write to it", path=path
        )
    os.set_blocking(fd, True)
    return fd


def _load_local_backend(cfg: ModelConfig) -> Any:
    from workers.backends import SentenceTransformerBackend

    return SentenceTransformerBackend(cfg, HostConfig(), place=False)


def _is_cuda_oom(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(seen):
            return True
        seen = seen.__cause__
    return False


def get_model_with_fallback() -> Any:
    """The seed's helper: the managed model, or else a model loaded in this process."""
    try:
        return ModelManager.get_model()
    except ShmModelError as exc:
        log.warning("shared model failed: %s; falling back to a model in this process", exc)
        metrics.FALLBACKS.inc()
        return ModelManager.get_instance().local_model()
