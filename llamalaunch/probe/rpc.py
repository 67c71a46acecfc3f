"""A small client of ggml's RPC protocol (v7): what devices an ggml-rpc-server worker has and their memory.

Wire format (ggml/src/ggml-rpc/ggml-rpc.cpp), little-endian and packed:
request `u8 cmd | u64 size | payload`, reply `u64 size | payload`. HELLO must come first.

A worker serves one client at a time: a second client's connect succeeds (kernel backlog) but its HELLO
waits until the first client leaves. A client that sends HELLO and then closes normally kills the worker
later: it writes the reply into the closed socket and dies of SIGPIPE (seen, exit status 141). So a
probe never walks away from a request it sent: the socket goes to a small detached keeper process that
waits for the reply and only then closes (see `_hand_off`).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llamalaunch.errors import BadInputError, ProbeError
from llamalaunch.units import MAX_SIZE_BYTES

RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
RPC_PROTO_PATCH = 0

CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15

_REQUEST_HEADER = struct.Struct("<BQ")  # cmd, payload size
_REPLY_HEADER = struct.Struct("<Q")  # payload size
_HELLO_REQUEST = bytes(24)  # conn_caps: all zero = plain TCP, no RDMA upgrade
_HELLO_REPLY = struct.Struct("<BBBx24s")  # major, minor, patch, pad, conn_caps
_DEVICE_COUNT_REPLY = struct.Struct("<I")
_DEVICE_MEMORY_REQUEST = struct.Struct("<I")
_DEVICE_MEMORY_REPLY = struct.Struct("<QQ")  # free, total

# A worker exposes one device per `-d` entry; more than this is a corrupt reply, not hardware.
MAX_DEVICES_PER_WORKER = 64
# How long a keeper waits for the reply a busy worker owes us before giving up (then it resets the
# connection, which the worker survives: its write fails with ECONNRESET instead of raising SIGPIPE).
KEEP_PENDING_S = 3600.0


@dataclass(frozen=True)
class WorkerDevice:
    """One device of a worker, under the worker's own index (the `-d` order)."""

    index: int
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class WorkerReport:
    endpoint: str
    version: str  # "7.0.0"
    devices: tuple[WorkerDevice, ...]
    elapsed_s: float
    round_trip_s: float | None = None  # the fastest request after HELLO: the link's latency


class RpcProbeError(ProbeError):
    """A worker could not be probed; `endpoint` says which."""

    def __init__(self, endpoint: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"RPC worker {endpoint}: {message}", hint)
        self.endpoint = endpoint


class WorkerRefusedError(RpcProbeError):
    """Nothing listens on that port."""


class WorkerUnreachableError(RpcProbeError):
    """The host does not resolve, does not answer, or has no route."""


class WorkerBusyError(RpcProbeError):
    """The worker accepted the connection but did not answer HELLO: it is serving another client.

    Not dead. Our request stays pending with a keeper process (`keeper_pid`) until the worker answers.
    """

    def __init__(self, endpoint: str, message: str, hint: str | None, keeper_pid: int | None) -> None:
        super().__init__(endpoint, message, hint)
        self.keeper_pid = keeper_pid


def _busy_error(endpoint: str, why: str, keeper_pid: int | None) -> WorkerBusyError:
    return WorkerBusyError(endpoint, f"busy serving another client: {why}", "stop the other client, e.g. a "
                           "running llama-server, or give this worker's size with --assume or --budget",
                           keeper_pid)


class WorkerResetError(RpcProbeError):
    """The worker reset the connection."""


class WorkerClosedError(RpcProbeError):
    """The worker closed the connection before a whole reply came (a short reply)."""


class WorkerStalledError(RpcProbeError):
    """A reply started (or the worker was ours) but did not finish in time."""


class WorkerReplyError(RpcProbeError):
    """A reply of the wrong size or with impossible values: not a ggml-rpc-server we understand."""


class WorkerVersionError(RpcProbeError):
    """The worker speaks another RPC protocol version than ours."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """(host, port) from 'HOST:PORT', as llama.cpp's --rpc takes it (IPv4 address or hostname)."""
    host, sep, port_text = text.strip().partition(":")
    valid = bool(sep and host and port_text.isdigit() and ":" not in port_text and " " not in host)
    if not valid or not 0 < int(port_text) < 65536:
        raise BadInputError(f"RPC endpoint {text!r} is not HOST:PORT",
                            "write it like 192.168.1.5:50052; llama.cpp's --rpc takes an IPv4 address "
                            "or a hostname")
    return host, int(port_text)


def probe_worker(endpoint: str, connect_timeout_s: float = 1.0, reply_timeout_s: float = 2.0) -> WorkerReport:
    """Ask one worker for its version, its devices and their free/total memory (<1 ms idle, loopback).

    Raises a `RpcProbeError` subclass naming the endpoint and the case; `WorkerBusyError` when the
    worker is serving another client. Never leaves the worker with an unanswered request on a closed
    socket. `BadInputError` when the endpoint is not HOST:PORT.
    """
    host, port = parse_endpoint(endpoint)
    if (pid := _live_keeper_of_ours(endpoint)) is not None:
        # Another connection would only queue behind ours; the worker's queue holds about two.
        raise _busy_error(endpoint, "an earlier probe from here still waits for its answer", pid)
    started = time.monotonic()
    sock = _connect(endpoint, host, port, connect_timeout_s)
    exchange = _Exchange(endpoint, sock, time.monotonic() + reply_timeout_s)
    try:
        version = exchange.hello()
        count = exchange.device_count()
        devices = tuple(exchange.device_memory(index) for index in range(count))
    except WorkerBusyError as exc:
        exc.keeper_pid = exchange.abandon()
        raise
    except BaseException:
        exchange.abandon()
        raise
    exchange.close()
    return WorkerReport(endpoint, version, devices, time.monotonic() - started, exchange.fastest_s)


def _connect(endpoint: str, host: str, port: int, timeout_s: float) -> socket.socket:
    try:
        address = socket.gethostbyname(host)  # IPv4 only, like llama.cpp's gethostbyname()
    except OSError as exc:
        raise WorkerUnreachableError(endpoint, f"cannot resolve host {host!r} ({exc})",
                                     "check the host name in --rpc") from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout_s)
    try:
        sock.connect((address, port))
    except ConnectionRefusedError:
        sock.close()
        raise WorkerRefusedError(endpoint, "connection refused: nothing listens on that port",
                                 f"start `ggml-rpc-server -H 0.0.0.0 -p {port}` on {host}, "
                                 "or fix the port in --rpc") from None
    except socket.timeout:
        sock.close()
        if keepers := keeper_pids(endpoint):
            # Its accept queue (listen backlog 1) is full of earlier probes still waiting: busy, not gone.
            raise _busy_error(endpoint, f"earlier probes still wait for their answers (pids "
                              f"{', '.join(map(str, keepers))}) and fill its queue", keepers[0]) from None
        raise WorkerUnreachableError(endpoint, f"no answer to the connection within {timeout_s:g} s",
                                     "check the host is up and its firewall; a worker whose queue of "
                                     "waiting clients is full also drops connects") from None
    except OSError as exc:
        sock.close()
        raise WorkerUnreachableError(endpoint, f"cannot connect: {exc.strerror or exc}",
                                     "check the address and the network route") from None
    return sock


class _Exchange:
    """One probe conversation; tracks how many reply bytes the worker still owes us."""

    def __init__(self, endpoint: str, sock: socket.socket, deadline: float) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.deadline = deadline
        self.owed_bytes = 0  # reply bytes the worker will still write to this socket
        self.accepted = False  # the worker answered HELLO: it is serving us
        self.fastest_s: float | None = None  # the fastest round trip after HELLO

    def hello(self) -> str:
        reply = self._call(CMD_HELLO, _HELLO_REQUEST, _HELLO_REPLY.size)
        major, minor, patch, _caps = _HELLO_REPLY.unpack(reply)
        self.accepted = True
        version = f"{major}.{minor}.{patch}"
        if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
            ours = f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.{RPC_PROTO_PATCH}"
            raise WorkerVersionError(self.endpoint, f"speaks RPC protocol v{version}, we speak v{ours}",
                                     "run a ggml-rpc-server from the same llama.cpp version as llama-server")
        return version

    def device_count(self) -> int:
        (count,) = _DEVICE_COUNT_REPLY.unpack(self._call(CMD_DEVICE_COUNT, b"", _DEVICE_COUNT_REPLY.size))
        if count == 0:
            raise WorkerReplyError(self.endpoint, "reports no devices", "check the worker's -d option")
        if count > MAX_DEVICES_PER_WORKER:
            raise WorkerReplyError(self.endpoint, f"claims {count} devices, which is not believable",
                                   "is that port really a ggml-rpc-server?")
        return count

    def device_memory(self, index: int) -> WorkerDevice:
        request = _DEVICE_MEMORY_REQUEST.pack(index)
        free, total = _DEVICE_MEMORY_REPLY.unpack(
            self._call(CMD_GET_DEVICE_MEMORY, request, _DEVICE_MEMORY_REPLY.size))
        if free > MAX_SIZE_BYTES or total > MAX_SIZE_BYTES:
            raise WorkerReplyError(self.endpoint, f"device {index} claims {free} bytes free of {total}, "
                                   "which is not believable", "is that port really a ggml-rpc-server?")
        return WorkerDevice(index, free, total)

    def _call(self, cmd: int, payload: bytes, reply_size: int) -> bytes:
        """Send one request and read its fixed-size reply; a reply of any other size is an error.

        The calls after HELLO are timed: the fastest is the link's round trip (the worker already serves
        us then, so no extra request is ever sent for it)."""
        started = time.perf_counter()
        reply = self._exchange(cmd, payload, reply_size)
        if cmd != CMD_HELLO:
            elapsed = time.perf_counter() - started
            self.fastest_s = elapsed if self.fastest_s is None else min(self.fastest_s, elapsed)
        return reply

    def _exchange(self, cmd: int, payload: bytes, reply_size: int) -> bytes:
        self._send(_REQUEST_HEADER.pack(cmd, len(payload)) + payload)
        self.owed_bytes = _REPLY_HEADER.size + reply_size
        (size,) = _REPLY_HEADER.unpack(self._recv(_REPLY_HEADER.size))
        if size != reply_size:
            self.owed_bytes = 0  # not a worker we understand: reset it rather than wait on it
            raise WorkerReplyError(self.endpoint, f"announced a {size}-byte reply to command {cmd} where "
                                   f"{reply_size} bytes were expected",
                                   f"is that port really a ggml-rpc-server of protocol v{RPC_PROTO_MAJOR}?")
        reply = self._recv(reply_size)
        self.owed_bytes = 0
        return reply

    def _send(self, data: bytes) -> None:
        self.sock.settimeout(max(self.deadline - time.monotonic(), 0.001))
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError):
            raise self._reset_error() from None
        except socket.timeout:
            raise self._timeout_error(started=False) from None

    def _recv(self, size: int) -> bytes:
        chunks: list[bytes] = []
        got = 0
        while got < size:
            self.sock.settimeout(max(self.deadline - time.monotonic(), 0.001))
            try:
                chunk = self.sock.recv(size - got)
            except ConnectionResetError:
                raise self._reset_error() from None
            except socket.timeout:
                raise self._timeout_error(started=got > 0) from None
            if not chunk:
                raise self._closed_error(got, size)
            chunks.append(chunk)
            got += len(chunk)
            self.owed_bytes -= len(chunk)
        return b"".join(chunks)

    def _reset_error(self) -> RpcProbeError:
        self.owed_bytes = 0
        return WorkerResetError(self.endpoint, "reset the connection",
                                "the worker may have crashed or restarted: look at its log")

    def _closed_error(self, got: int, size: int) -> RpcProbeError:
        self.owed_bytes = 0
        if not self.accepted and got == 0:
            return WorkerClosedError(self.endpoint, "closed the connection after HELLO",
                                     "it probably speaks another RPC protocol version: run a "
                                     "ggml-rpc-server from the same llama.cpp version as llama-server")
        return WorkerClosedError(self.endpoint, f"closed the connection after {got} of {size} reply bytes "
                                 "(short reply)", "look at the worker's log")

    def _timeout_error(self, started: bool) -> RpcProbeError:
        if not self.accepted and not started:
            return _busy_error(self.endpoint, "it accepted the connection but did not answer HELLO in "
                               "time, and a worker serves one client at a time", None)
        return WorkerStalledError(self.endpoint, "stopped answering in the middle of the probe",
                                  "the worker may be hung: look at its log and restart it")

    def close(self) -> None:
        """Normal end: nothing owed, so the worker reads EOF where it waits for a command and moves on."""
        self.sock.close()

    def abandon(self) -> int | None:
        """End after an error: never close on a request the worker will still answer; the keeper's pid."""
        if self.owed_bytes > 0:
            return _hand_off(self.sock, self.owed_bytes, self.endpoint)
        _close_with_reset(self.sock)
        return None


def _close_with_reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: a worker writing to a reset socket gets ECONNRESET, not SIGPIPE."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# The keeper runs in its own process and session, so that nothing that happens to the caller (exit,
# Ctrl-C, SIGKILL) closes a socket on which a request is still pending. It waits for the owed bytes,
# then closes; at the time limit, or on any error, it resets the connection instead.
_KEEPER_CODE = r"""
import select, socket, struct, sys, time

def keep_until_answered(sock, owed, limit_s):
    deadline = time.monotonic() + limit_s
    try:
        while owed > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                break
            readable, _, _ = select.select([sock], [], [], min(left, 60.0))
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                owed -= len(data)
    except OSError:
        pass
    sock.close()

if __name__ == "__main__":  # argv: fd, owed bytes, time limit, endpoint (only for `ps` and keeper_pids)
    keep_until_answered(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]), float(sys.argv[3]))
"""
_KEEPER_MARK = "keep_until_answered"
_keeper_namespace: dict[str, object] = {"__name__": "llamalaunch_keeper"}
exec(compile(_KEEPER_CODE, "<rpc keeper>", "exec"), _keeper_namespace)  # noqa: S102 - our own constant
_keep_until_answered: Callable[[socket.socket, int, float], None] = _keeper_namespace[  # type: ignore[assignment]
    "keep_until_answered"]

_keepers: dict[str, list[subprocess.Popen[bytes]]] = {}  # endpoint → keepers this process started
_keepers_lock = threading.Lock()


def _hand_off(sock: socket.socket, owed_bytes: int, endpoint: str) -> int | None:
    """Give the socket to a detached keeper process; returns its pid (None: a thread of ours keeps it)."""
    sock.setblocking(True)
    try:
        keeper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _KEEPER_CODE, str(sock.fileno()), str(owed_bytes),
             str(KEEP_PENDING_S), endpoint],
            pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd="/", start_new_session=True)
    except OSError:
        # Cannot spawn: keep it in this process instead (safe until this process exits).
        threading.Thread(target=_keep_until_answered, args=(sock, owed_bytes, KEEP_PENDING_S),
                         daemon=True, name="rpc-keeper").start()
        return None
    sock.close()  # the keeper holds its own reference: no FIN goes out
    with _keepers_lock:
        for started in _keepers.values():
            started[:] = [other for other in started if other.poll() is None]  # reaps finished ones
        _keepers.setdefault(endpoint, []).append(keeper)
    return keeper.pid


def _live_keeper_of_ours(endpoint: str) -> int | None:
    with _keepers_lock:
        live = [keeper for keeper in _keepers.get(endpoint, []) if keeper.poll() is None]
    return live[0].pid if live else None


def keeper_pids(endpoint: str) -> list[int]:
    """Keeper processes (of any earlier llamalaunch run) still waiting on this worker."""
    import psutil  # only on this rare path: a scan of all processes takes tens of milliseconds

    pids = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if len(cmdline) >= 4 and cmdline[-1] == endpoint and any(_KEEPER_MARK in arg for arg in cmdline):
            pids.append(process.pid)
    return pids


def wait_for_keepers(timeout_s: float) -> bool:
    """Wait until every keeper this process started has got its reply; True when none is left."""
    deadline = time.monotonic() + timeout_s
    with _keepers_lock:
        keepers = [keeper for started in _keepers.values() for keeper in started]
    for keeper in keepers:
        try:
            keeper.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            return False
    return True
