"""Client of the model host: ``SentenceTransformer.encode`` over a Unix socket.

It imports neither torch nor sentence_transformers (only numpy), so a process that
uses it starts in milliseconds and holds no copy of the model. It is thread-safe: each
request borrows a connection from a small pool, and a connection that saw a timeout or
an error is closed, never reused, so a late reply can never answer another request.

Before it sends anything to a socket, it checks that the socket's directory and the socket
belong to a trusted uid (this user, root or ``SHM_MODEL_TRUSTED_UIDS``), that the directory
is not writable by others, and, once connected, that the serving process runs as a trusted
uid: another local user who got to a shared path first cannot receive its texts or forge
its vectors.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Collection, Iterable
from typing import Any, Protocol

import numpy as np

from config import client_env
from shm_model.errors import (
    BadRequest,
    HostUnavailable,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
)
from shm_model.protocol import (
    PRIORITIES,
    ConnectionClosed,
    Frame,
    default_priority,
    pack,
    raise_for_reply,
    recv_frame,
    too_long,
    validate_texts,
    vectors_from_frame,
)

#: Texts and bytes sent in one request; longer inputs go as several requests.
CHUNK_TEXTS = 256
CHUNK_BYTES = 8 * 1024 * 1024
#: Bound on a reply frame: CHUNK_TEXTS vectors of up to 65,536 float32 each, plus headers.
MAX_REPLY_BYTES = CHUNK_TEXTS * 65536 * 4 + (1 << 20)
#: How much later than the deadline the client gives up on a silent host.
DEADLINE_SLACK = 0.05


def trusted_uid_set(extra: Iterable[int] = ()) -> frozenset[int]:
    """This user, root, and ``extra`` (``SHM_MODEL_TRUSTED_UIDS``)."""
    return frozenset((os.getuid(), os.geteuid(), 0, *extra))


def _untrusted(what: str, uid: int, trusted: Collection[int], socket_path: str, **details: Any) -> PermissionDenied:
    others = sorted(set(trusted) - {os.getuid(), os.geteuid(), 0})
    return PermissionDenied(
        f"{what} uid {uid}, which is not this user ({os.geteuid()}), root or a trusted uid "
        f"(SHM_MODEL_TRUSTED_UIDS: {', '.join(map(str, others)) or 'none'}); refusing to use the host at "
        f"{socket_path}",
        socket=socket_path,
        owner=uid,
        **details,
    )


def check_socket_directory(directory: str, trusted: Collection[int], socket_path: str) -> None:
    """Raise PermissionDenied unless ``directory`` belongs to a trusted uid and only its owner may write
    to it (so nobody else can put a socket or a file there); FileNotFoundError when it does not exist."""
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionDenied(f"{directory} is not a directory; refusing to use {socket_path}", socket=socket_path)
    if st.st_uid not in trusted:
        raise _untrusted(f"socket directory {directory} belongs to", st.st_uid, trusted, socket_path, path=directory)
    if st.st_mode & 0o022:
        raise PermissionDenied(
            f"socket directory {directory} (uid {st.st_uid}) has mode {stat.S_IMODE(st.st_mode):04o}: other "
            f"users may write to it; refusing to use {socket_path} (the host's socket belongs in a private directory)",
            socket=socket_path,
            path=directory,
            owner=st.st_uid,
        )


def check_socket(socket_path: str, trusted: Collection[int]) -> None:
    """Raise PermissionDenied unless the socket and its directory belong to trusted uids and the
    directory is private to its owner; HostUnavailable when there is no socket to check."""
    try:
        check_socket_directory(os.path.dirname(socket_path) or ".", trusted, socket_path)
        st = os.stat(socket_path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise HostUnavailable(
            f"no host is serving {socket_path} ({exc.strerror}); start one with 'shm-model serve'",
            socket=socket_path,
        ) from None
    except PermissionDenied:
        raise
    except PermissionError as exc:  # a private directory of another user
        raise PermissionDenied(
            f"cannot connect to the host at {socket_path}: {exc.strerror} "
            "(the host runs as another user or its socket is private)",
            socket=socket_path,
        ) from None
    if st.st_uid not in trusted:
        raise _untrusted(f"socket {socket_path} belongs to", st.st_uid, trusted, socket_path, path=socket_path)


def check_peer(sock: socket.socket, trusted: Collection[int], socket_path: str) -> None:
    """Raise PermissionDenied unless the process that listens on ``sock`` runs as a trusted uid."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    if uid not in trusted:
        raise _untrusted(f"the process serving {socket_path} (pid {pid}) runs as", uid, trusted, socket_path, pid=pid)


class HostClient:
    """Encode with the shared model host.

    ``socket_path`` defaults to ``SHM_MODEL_SOCKET`` (or its default); ``timeout`` (seconds)
    to ``SHM_MODEL_REQUEST_TIMEOUT``; ``trusted_uids`` (uids besides this user and root that
    may serve it) to ``SHM_MODEL_TRUSTED_UIDS``. Errors are the typed ones of ``shm_model.errors``.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float | None = None,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        trusted_uids: Iterable[int] | None = None,
    ) -> None:
        self.socket_path = socket_path or client_env.socket_path()
        self.timeout = timeout if timeout is not None else client_env.request_timeout()
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        extra = client_env.trusted_uids() if trusted_uids is None else tuple(trusted_uids)
        self.trusted_uids = trusted_uid_set(extra)
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False

    # --- connections -----------------------------------------------------------------

    def _connect(self, deadline: float) -> socket.socket:
        check_socket(self.socket_path, self.trusted_uids)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.001, min(self.connect_timeout, deadline - time.monotonic())))
        try:
            sock.connect(self.socket_path)
        except PermissionError as exc:
            sock.close()
            raise PermissionDenied(
                f"cannot connect to the host at {self.socket_path}: {exc.strerror} "
                "(the host runs as another user or its socket is private)",
                socket=self.socket_path,
            ) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise HostUnavailable(
                f"no host is serving {self.socket_path} ({exc.strerror}); start one with 'shm-model serve'",
                socket=self.socket_path,
            ) from None
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise HostUnavailable(
                f"cannot connect to the host at {self.socket_path}: {exc}", socket=self.socket_path
            ) from None
        try:
            check_peer(sock, self.trusted_uids, self.socket_path)  # the path may have changed since it was checked
        except BaseException:
            sock.close()
            raise
        return sock

    def _acquire(self, deadline: float) -> tuple[socket.socket, bool]:
        with self._lock:
            if self._closed:
                raise HostUnavailable("this client is closed")
            if self._idle:
                return self._idle.pop(), True
        return self._connect(deadline), False

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.pool_size:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------------

    def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> Frame:
        """Send one request and return its successful reply frame, or raise its typed error."""
        timeout = self.timeout if timeout is None else timeout
        if not timeout > 0:
            raise BadRequest(f"timeout must be > 0 seconds, got {timeout!r}")
        return self._request(op, time.monotonic() + timeout, fields)

    def _request(self, op: str, deadline: float, fields: dict[str, Any]) -> Frame:
        rid = next(self._ids)
        for attempt in range(2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout("the request's deadline passed before it was sent")
            header = {"id": rid, "op": op, "timeout_ms": round(remaining * 1000, 3), **fields}
            sock, reused = self._acquire(deadline)
            try:
                sock.settimeout(max(0.001, remaining + DEADLINE_SLACK))
                try:
                    sock.sendall(pack(header))
                except (BrokenPipeError, ConnectionResetError) as exc:
                    # The host may have refused the frame (too large) and closed: its reply waits.
                    sock.settimeout(0.2)
                    try:
                        frame = recv_frame(sock, MAX_REPLY_BYTES)
                    except TimeoutError:
                        raise exc from None
                else:
                    frame = recv_frame(sock, MAX_REPLY_BYTES)
            except TimeoutError:
                sock.close()
                raise RequestTimeout(
                    f"no reply from the host within {remaining:.3f}s", timeout=round(remaining, 3)
                ) from None
            except (ConnectionClosed, ConnectionError) as exc:
                sock.close()
                at_boundary = not isinstance(exc, ConnectionClosed) or exc.at_boundary
                if reused and attempt == 0 and at_boundary:
                    continue  # a pooled connection the host had closed; try a fresh one once
                raise HostUnavailable(
                    f"the host at {self.socket_path} closed the connection ({exc})", socket=self.socket_path
                ) from None
            except BaseException:
                sock.close()
                raise
            reply_id = frame.header.get("id")
            if reply_id is None and frame.header.get("ok") is False:
                sock.close()  # a connection-level error: the host closes this connection
            elif reply_id != rid:
                sock.close()
                raise ProtocolError(f"reply for request {reply_id!r}, expected {rid}")
            else:
                self._release(sock)
            return raise_for_reply(frame)
        raise HostUnavailable(f"the host at {self.socket_path} keeps closing connections")

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request("ping", timeout=timeout).header["result"]

    def info(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request("info", timeout=timeout).header["result"]

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request("status", timeout=timeout).header["result"]

    def reload(self, timeout: float | None = 600.0) -> dict[str, Any]:
        return self.request("reload", timeout=timeout).header["result"]

    def stop(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request("stop", timeout=timeout).header["result"]

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.info()["dimension"])

    get_embedding_dimension = get_sentence_embedding_dimension

    @property
    def max_seq_length(self) -> int:
        return int(self.info()["max_seq_length"])

    # --- encode ------------------------------------------------------------------------

    def encode(
        self,
        sentences: str | Iterable[str],
        batch_size: int = 32,
        show_progress_bar: bool | None = False,
        output_value: str | None = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        timeout: float | None = None,
        priority: str | None = None,
        truncate_dim: int | None = None,
        truncate: bool = True,
        return_usage: bool = False,
        model: str | None = None,
    ) -> Any:
        """Embed ``sentences`` like ``SentenceTransformer.encode``.

        A string gives a 1-D array, a list a 2-D array (an empty list: shape (0, dim)).
        ``batch_size`` sets the request size when a progress bar is shown; the host forms
        its own batches across all clients. A long input goes as several requests: an explicit
        ``timeout`` bounds the whole call; without one, each request gets the client's default
        timeout, so a large corpus is not cut off by a limit meant for one request.

        ``priority`` is ``interactive`` (served first: a query) or ``bulk`` (an ingestion; it keeps a
        share of the host but waits behind queries); by default a call of at most
        ``INTERACTIVE_MAX_TEXTS`` texts is interactive and a larger one bulk.

        ``truncate_dim`` keeps the first dimensions of each vector (before ``normalize_embeddings``,
        as sentence-transformers does); more than the model has is a BadRequest. ``truncate=False``
        refuses an input longer than the model's ``max_seq_length`` tokens (``PayloadTooLarge``
        naming the item and its token count) instead of encoding its first tokens. With
        ``return_usage=True`` the call returns ``(embeddings, tokens)``: the tokens the model read
        (prompts and special tokens included, counted by the model's tokenizer). ``model`` picks
        one of the models a host serves (``MODEL_NAME=a,b``; by its served name or as configured;
        ``info()["models"]`` lists them): the first by default; another is ``ModelNotFound``.
        """
        if output_value != "sentence_embedding" or precision != "float32":
            raise BadRequest("the host returns float32 sentence embeddings only")
        if batch_size < 1:
            raise BadRequest(f"batch_size must be >= 1, got {batch_size}")
        single = isinstance(sentences, str)
        if single:
            texts = [sentences]
        elif isinstance(sentences, bytes | bytearray) or not isinstance(sentences, Iterable):
            raise BadRequest(f"sentences must be a string or a list of strings, not {type(sentences).__name__}")
        else:
            texts = validate_texts(list(sentences), limit=None)  # sent in chunks below the host's limit
        if timeout is not None and not timeout > 0:
            raise BadRequest(f"timeout must be > 0 seconds, got {timeout!r}")
        if priority is not None and priority not in PRIORITIES:
            raise BadRequest(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        if truncate_dim is not None and (
            isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or truncate_dim < 1
        ):
            raise BadRequest(f"truncate_dim must be an integer >= 1, got {truncate_dim!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        fields: dict[str, Any] = {"priority": priority or default_priority(len(texts))}
        if not truncate:
            fields["truncate"] = False
        if model is not None:
            if not isinstance(model, str) or not model:
                raise BadRequest(f"model must be a non-empty string, got {model!r:.64}")
            fields["model"] = model
        if prompt is not None:
            fields["prompt"] = prompt
        elif prompt_name is not None:
            fields["prompt_name"] = prompt_name

        chunks = list(_chunks(texts, batch_size if show_progress_bar else CHUNK_TEXTS))
        progress = None
        if show_progress_bar and len(chunks) > 1:
            from tqdm import tqdm

            progress = tqdm(total=len(texts), desc="Batches", unit="text")
        result: np.ndarray | None = None
        tokens = 0
        try:
            offset = 0
            for chunk in chunks:
                chunk_deadline = deadline if deadline is not None else time.monotonic() + self.timeout
                try:
                    frame = self._request("encode", chunk_deadline, {"texts": chunk, **fields})
                except PayloadTooLarge as exc:
                    index, count, limit = (exc.details.get(k) for k in ("index", "tokens", "limit"))
                    if offset and isinstance(index, int) and isinstance(count, int) and isinstance(limit, int):
                        raise too_long(index + offset, count, limit) from None  # the index in the whole input
                    raise
                vectors = vectors_from_frame(frame)
                used = frame.header.get("tokens")
                if return_usage and (not isinstance(used, int) or isinstance(used, bool) or used < 0):
                    raise ProtocolError(f"the host's reply has no token count (tokens={used!r:.40})")
                tokens += used if return_usage else 0
                if vectors.shape[0] != len(chunk):
                    raise ProtocolError(f"host returned {vectors.shape[0]} vectors for {len(chunk)} texts")
                if result is None:
                    result = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
                result[offset : offset + len(chunk)] = vectors
                offset += len(chunk)
                if progress is not None:
                    progress.update(len(chunk))
        finally:
            if progress is not None:
                progress.close()
        assert result is not None
        if truncate_dim is not None:
            if truncate_dim > result.shape[1]:
                raise BadRequest(
                    f"truncate_dim={truncate_dim} is more than the model's dimension {result.shape[1]}",
                    truncate_dim=truncate_dim,
                    dimension=result.shape[1],
                )
            result = np.ascontiguousarray(result[:, :truncate_dim])
        if normalize_embeddings and len(result):
            norms = np.linalg.norm(result, axis=1, keepdims=True)
            result = result / np.maximum(norms, 1e-12)
        embeddings = _convert(result, single, convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor)
        return (embeddings, tokens) if return_usage else embeddings


def _convert(result: np.ndarray, single: bool, *, convert_to_numpy: bool, convert_to_tensor: bool) -> Any:
    if convert_to_tensor:
        import torch

        tensor = torch.from_numpy(result)
        return tensor[0] if single else tensor
    if not convert_to_numpy:
        import torch

        rows = [torch.from_numpy(row) for row in result]
        return rows[0] if single else rows
    return result[0] if single else result


def _chunks(texts: list[str], size: int) -> Iterable[list[str]]:
    """Split texts into requests of at most ``size`` texts and about CHUNK_BYTES."""
    if not texts:
        yield []
        return
    chunk: list[str] = []
    nbytes = 0
    for text in texts:
        n = len(text.encode("utf-8"))
        if chunk and (len(chunk) >= size or nbytes + n > CHUNK_BYTES):
            yield chunk
            chunk, nbytes = [], 0
        chunk.append(text)
        nbytes += n
    yield chunk


class _Process(Protocol):
    """What ``wait_for_host`` needs of a started host process (``subprocess.Popen`` has it)."""

    returncode: int | None

    def poll(self) -> int | None: ...


def wait_for_host(
    socket_path: str | None = None, timeout: float = 60.0, interval: float = 0.05, process: _Process | None = None
) -> dict[str, Any]:
    """Poll until a host answers a ping on ``socket_path``; raise HostUnavailable at the deadline,
    or as soon as ``process``, the host started for this socket, has exited."""
    deadline = time.monotonic() + timeout
    client = HostClient(socket_path, timeout=min(5.0, timeout))
    try:
        while True:
            try:
                return client.ping()
            except (HostUnavailable, RequestTimeout):
                if process is not None and process.poll() is not None:
                    raise HostUnavailable(
                        f"the host started on {client.socket_path} exited with {process.returncode} before it answered"
                    ) from None
                if time.monotonic() >= deadline:
                    raise HostUnavailable(f"no host answered on {client.socket_path} within {timeout:g}s") from None
                time.sleep(interval)
    finally:
        with contextlib.suppress(Exception):
            client.close()
