"""Socket activation: take the listening Unix socket that systemd passed, when it passed one.

systemd's protocol (sd_listen_fds(3)): the passed descriptors start at fd 3, ``LISTEN_FDS``
says how many and ``LISTEN_PID`` names the process they are meant for (a child that inherits
the environment must not take them). The host serves one socket, so it takes fd 3 and
refuses anything but a listening Unix stream socket.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

from shm_model.errors import ConfigError

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
#: More than this many passed descriptors is not a socket unit of ours.
MAX_LISTEN_FDS = 64


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed as fd 3, non-blocking and close-on-exec; ``None`` when
    this process was not socket-activated. The ``LISTEN_*`` variables are removed so that no child
    takes the socket again. A passed descriptor that is not a listening Unix stream socket raises
    ``ConfigError``."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if not pid or not count:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid():
        return None  # meant for another process (e.g. the one that started us)
    if not count.isdigit() or not 1 <= int(count) <= MAX_LISTEN_FDS:
        raise ConfigError(f"LISTEN_FDS={count!r} is invalid; allowed values: an integer from 1 to {MAX_LISTEN_FDS}")
    if int(count) > 1:
        log.warning("systemd passed %s sockets; serving the first (fd %d)", count, LISTEN_FDS_START)
    try:
        mode = os.fstat(LISTEN_FDS_START).st_mode
    except OSError as exc:
        raise ConfigError(f"LISTEN_FDS={count} but fd {LISTEN_FDS_START} is not open ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"fd {LISTEN_FDS_START} passed by systemd is not a socket")
    sock = socket.socket(fileno=LISTEN_FDS_START)
    accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not accepting:
        sock.detach()
        raise ConfigError(
            f"fd {LISTEN_FDS_START} passed by systemd is not a listening Unix stream socket; "
            "use ListenStream=/path in the socket unit"
        )
    os.set_inheritable(LISTEN_FDS_START, False)
    sock.setblocking(False)
    log.info("serving the socket systemd passed: %s", sock.getsockname() or "(unnamed)")
    return sock
