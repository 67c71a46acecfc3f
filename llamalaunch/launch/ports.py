"""The port llama-server listens on: its own default, or checked free before anything starts."""

from __future__ import annotations

import errno
import socket

from llamalaunch.errors import ServeError
from llamalaunch.options import LLAMA_SERVER_PORT

DEFAULT_PORT = LLAMA_SERVER_PORT  # llama-server's own default: the URL stays the same from run to run
ANY_PORT = 0


def pick_port(host: str, port: int, reuse_port: bool = False) -> int:
    """The port llama-server will get (ANY_PORT: a free one); a taken one is refused before anything starts.
    Bound as llama-server binds (cpp-httplib): getaddrinfo's addresses in order, the first that binds wins,
    with SO_REUSEADDR, so a previous run's connections left in TIME_WAIT do not count as taken."""
    failure: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # --reuse-port after --
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # cpp-httplib's default
            try:
                sock.bind(address)
                return int(sock.getsockname()[1])
            except OSError as error:
                failure = error
    if failure is not None and failure.errno == errno.EADDRINUSE:
        raise ServeError(f"cannot listen on {host}:{port}: port {port} is in use",
                         "stop what listens there, or pass another --port N, or --port 0 for any free one")
    why = failure.strerror if failure is not None else "no address to bind"
    raise ServeError(f"cannot listen on {host}:{port}: {why}", "give --host an address of this machine")
