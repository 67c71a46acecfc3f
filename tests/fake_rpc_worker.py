"""A loopback socket server of the tests' own that misbehaves like a broken or hostile RPC worker.

Only for the cases a real ggml-rpc-server cannot be made to show: garbage, stalls, absurd sizes,
another protocol version. Each connection is served by the chosen `behaviour` in a thread.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType

HELLO_REPLY_V7 = struct.pack("<Q", 28) + bytes([7, 0, 0, 0]) + bytes(24)
_REQUEST_HEADER = struct.Struct("<BQ")


def _reply(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload)) + payload


def _read_request(conn: socket.socket) -> tuple[int, bytes] | None:
    header = _recv_exact(conn, _REQUEST_HEADER.size)
    if header is None:
        return None
    cmd, size = _REQUEST_HEADER.unpack(header)
    payload = _recv_exact(conn, min(size, 1024)) if size else b""
    return (cmd, payload) if payload is not None else None


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _serve_like_v7(conn: socket.socket, device_count: int = 1, free: int = 6 << 30, total: int = 8 << 30,
                   hello: bytes = HELLO_REPLY_V7) -> None:
    """A well-behaved worker, with the values given."""
    while (request := _read_request(conn)) is not None:
        cmd, _payload = request
        if cmd == 14:
            conn.sendall(hello)
        elif cmd == 15:
            conn.sendall(_reply(struct.pack("<I", device_count)))
        elif cmd == 11:
            conn.sendall(_reply(struct.pack("<QQ", free, total)))
        else:
            return


def _never_answer(conn: socket.socket) -> None:
    _read_request(conn)
    conn.recv(1)  # until the client goes


def _silent_to_hello_hangs_up_on_others(conn: socket.socket) -> None:
    """Not a worker: leaves a HELLO unanswered, and hangs up on anything else (a worker could not: it
    serves the first connection only)."""
    if conn.recv(1, socket.MSG_PEEK) == bytes([14]):
        _never_answer(conn)


def _garbage(conn: socket.socket) -> None:
    _read_request(conn)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def _oversized(conn: socket.socket) -> None:
    _read_request(conn)
    conn.sendall(struct.pack("<Q", 1 << 40))  # claims a terabyte-sized reply


def _short_reply(conn: socket.socket) -> None:
    _read_request(conn)
    conn.sendall(HELLO_REPLY_V7[:12])


def _close_after_hello(conn: socket.socket) -> None:
    """What a ggml-rpc-server of another HELLO size does: log an error and hang up."""
    _read_request(conn)


def _reset(conn: socket.socket) -> None:
    _read_request(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _slowloris(conn: socket.socket) -> None:
    _read_request(conn)
    for byte in HELLO_REPLY_V7:
        conn.sendall(bytes([byte]))
        time.sleep(0.3)


def _stall_after_hello(conn: socket.socket) -> None:
    _read_request(conn)
    conn.sendall(HELLO_REPLY_V7)
    _read_request(conn)
    conn.recv(1)


BEHAVIOURS: dict[str, Callable[[socket.socket], None]] = {
    "good": _serve_like_v7,
    "two_devices": lambda conn: _serve_like_v7(conn, device_count=2),
    "never_answer": _never_answer,
    "close_after_hello_when_second": _silent_to_hello_hangs_up_on_others,
    "garbage": _garbage,
    "oversized": _oversized,
    "short_reply": _short_reply,
    "close_after_hello": _close_after_hello,
    "reset": _reset,
    "slowloris": _slowloris,
    "stall_after_hello": _stall_after_hello,
    "absurd_count": lambda conn: _serve_like_v7(conn, device_count=1_000_000),
    "zero_devices": lambda conn: _serve_like_v7(conn, device_count=0),
    "absurd_size": lambda conn: _serve_like_v7(conn, free=1 << 62, total=1 << 63),
    "major_8": lambda conn: _serve_like_v7(conn, hello=_reply(bytes([8, 0, 0, 0]) + bytes(24))),
    "minor_1": lambda conn: _serve_like_v7(conn, hello=_reply(bytes([7, 1, 0, 0]) + bytes(24))),
    "patch_9": lambda conn: _serve_like_v7(conn, hello=_reply(bytes([7, 0, 9, 0]) + bytes(24))),
}


class FakeRpcWorker:
    """`with FakeRpcWorker("garbage") as fake: probe_worker(fake.endpoint)`."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = BEHAVIOURS[behaviour]
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeRpcWorker:  # noqa: PYI034 (a final test helper, never subclassed)
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # a close alone neither wakes a blocked recv nor sends FIN
            conn.close()
        self.thread.join(2)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.behaviour(conn)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()


class FullBacklog:
    """A listener that never accepts, its queue filled: further connects time out (SYNs dropped)."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = int(self.listener.getsockname()[1])
        self.fillers: list[socket.socket] = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)
        time.sleep(0.05)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        for sock in [*self.fillers, self.listener]:
            sock.close()


class BusyRpcWorker:
    """Like a ggml-rpc-server busy with another client: listen backlog 1 and no accept() until `free()`,
    then it serves each connection in turn like a good v7 worker (what a real worker does next)."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)  # as ggml-rpc's transport does: two connections wait, a third is not taken
        self.port = int(self.listener.getsockname()[1])
        self.hellos = 0
        self.thread = threading.Thread(target=self._serve_in_turn, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def free(self) -> None:
        self.thread.start()

    def _serve_in_turn(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                if conn.recv(1, socket.MSG_PEEK) == bytes([14]):
                    self.hellos += 1
                    _serve_like_v7(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        if self.thread.is_alive():
            self.thread.join(2)
