"""The host's run directory: the socket's private directory, its lock, stale files, the
listening socket, and cleanup on exit.

One host serves one socket path. ``take`` makes (or checks) the directory, takes an
exclusive ``flock`` on ``<socket>.lock`` (naming the holder's pid if another host has it),
and removes what a host that died left behind: its socket and its ``/dev/shm/torch_*``
files. ``bind`` listens with permissions that match ``SHM_MODEL_ALLOWED_UIDS``; ``cleanup``
removes the socket, the lock and a directory this host made.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import socket
import stat
from collections.abc import Collection

from shm_model.activation import inherited_socket
from shm_model.errors import ConfigError

log = logging.getLogger(__name__)

#: Connections the kernel queues before the host accepts them.
LISTEN_BACKLOG = 1024


class RunDirectory:
    def __init__(self, socket_path: str, allowed_uids: Collection[int] = ()) -> None:
        self.socket_path = socket_path
        self.lock_path = socket_path + ".lock"
        self.directory = os.path.dirname(socket_path)
        self.shared = bool(allowed_uids)  # other uids may connect: the directory is traversable
        self._lock_fd: int | None = None
        self._made_dir = False
        self._listen: socket.socket | None = None

    def take(self) -> None:
        """Make or check the private directory, take the lock, remove stale files."""
        mode = 0o711 if self.shared else 0o700
        try:
            os.makedirs(self.directory, mode=mode)
            self._made_dir = True
        except FileExistsError:
            pass
        st = os.stat(self.directory)
        if st.st_uid != os.getuid():
            raise ConfigError(
                f"socket directory {self.directory} belongs to uid {st.st_uid}, not to this user "
                f"({os.getuid()}); choose another SHM_MODEL_SOCKET"
            )
        if st.st_mode & 0o777 & ~mode:
            raise ConfigError(
                f"socket directory {self.directory} has mode {st.st_mode & 0o777:04o}; the host needs a "
                f"private directory (mode {mode:04o}): run 'chmod {mode:o} {self.directory}' or choose "
                "another SHM_MODEL_SOCKET"
            )
        self._lock()
        if os.path.lexists(self.socket_path):
            if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                self._unlock()
                raise ConfigError(f"{self.socket_path} exists and is not a socket; choose another SHM_MODEL_SOCKET")
            log.info("removing stale socket %s left by a host that died", self.socket_path)
            os.unlink(self.socket_path)
        remove_stale_segments()

    def _lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"another host (pid {holder}) is already serving {self.socket_path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def bind(self) -> socket.socket:
        """Listen on the socket path: this uid only, or every uid when others are allowed (the
        host then checks each peer's uid itself). Under systemd socket activation, the socket
        systemd passed (``LISTEN_FDS``) instead; it is systemd's to remove."""
        if (inherited := inherited_socket()) is not None:
            return inherited
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o111 if self.shared else 0o177)
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o666 if self.shared else 0o600)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self._listen = sock
        return sock

    def cleanup(self) -> None:
        if self._listen is not None:
            self._listen.close()
            self._listen = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)
            self._unlock()
            if self._made_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(self.directory)


def remove_stale_segments(pattern: str = "/dev/shm/torch_*") -> list[str]:
    """Remove this user's torch shared-memory files whose process no longer exists; returns them."""
    removed = []
    for path in glob.glob(pattern):
        try:
            pid = int(os.path.basename(path).split("_")[1])
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except (ValueError, IndexError, PermissionError, FileNotFoundError):
            continue
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                log.info("removed stale shared-memory file %s", path)
                removed.append(path)
    return removed
