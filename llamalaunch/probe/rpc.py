"""A small client of ggml's RPC protocol (v7): what devices an ggml-rpc-server worker has and their memory.

Wire format (ggml/src/ggml-rpc/ggml-rpc.cpp), little-endian and packed:
request `u8 cmd | u64 size | payload`, reply `u64 size | payload`. HELLO must come first.

A worker serves one client at a time: a second client's connect succeeds (kernel backlog) but its HELLO
waits until the first client leaves. A client that sends HELLO and then closes normally kills the worker
later: it writes the reply into the closed socket and dies of SIGPIPE (seen, exit status 141). So a
probe never walks away from a request it sent: the socket goes to a small detached keeper process that
waits for the reply and only then closes (see `_hand_off`); one keeper per endpoint at a time, for at most
`KEEP_PENDING_S`, after which it resets the connection (a Linux worker survives a reset, see there).

A HELLO without an answer is not always a busy worker: an HTTP server, for one, waits silently for a
line that never comes. `_second_opinion` tells them apart with a second connection.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamalaunch.errors import BadInputError, ProbeError
from llamalaunch.paths import state_dir
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
# How long a keeper waits for the reply a busy worker owes us before giving up. Then it resets the
# connection: a worker on Linux survives that (its write fails with ECONNRESET instead of raising
# SIGPIPE, which only a connection closed with FIN brings; tested with real workers), and the next probe
# finds the worker busy again at the cost of one more short wait, never a pile of waiters.
KEEP_PENDING_S = 60.0
# After an unanswered HELLO: how long a second connection may take to connect and to be answered.
SECOND_OPINION_S = 0.5
# Sent on that second connection. Any server that speaks HTTP answers it; a ggml-rpc-server that gets to
# it reads b"G" where HELLO must come first and hangs up without writing (rpc_serve_client), so it is
# harmless to a worker.
_SECOND_OPINION_REQUEST = b"GET / HTTP/1.0\r\n\r\n"


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
        self.reason = message  # what went wrong, without the endpoint ("connection refused: ...")


class WorkerRefusedError(RpcProbeError):
    """Nothing listens on that port."""


class WorkerUnreachableError(RpcProbeError):
    """The host does not resolve, does not answer, or has no route."""


class WorkerBusyError(RpcProbeError):
    """The worker accepted the connection but did not answer HELLO: it is serving another client.

    Not dead. Our request stays pending with a keeper process (`keeper_pid`) until the worker answers.
    `holder` says who holds the worker, as far as this machine can tell ("llama-server, pid 4242").
    """

    def __init__(self, endpoint: str, message: str, hint: str | None, keeper_pid: int | None,
                 holder: str = "") -> None:
        super().__init__(endpoint, message, hint)
        self.keeper_pid = keeper_pid
        self.holder = holder


def _busy_error(endpoint: str, why: str, keeper_pid: int | None) -> WorkerBusyError | WorkerStoppedError:
    if (stopped := stopped_worker(endpoint)) is not None:
        return WorkerStoppedError(endpoint, stopped)
    holder = describe_holder(endpoint)
    return WorkerBusyError(endpoint, f"busy serving another client ({holder}): {why}", "stop the other "
                           "client, e.g. a running llama-server, or give this worker's size with --assume or "
                           "--budget", keeper_pid, holder)


class WorkerStoppedError(RpcProbeError):
    """Not busy but down: the worker's process on this machine is stopped (SIGSTOP, Ctrl-Z), so it accepts
    connections and answers nothing."""

    def __init__(self, endpoint: str, pid: int) -> None:
        super().__init__(endpoint, f"does not answer: its ggml-rpc-server (pid {pid}) is stopped",
                         f"`kill -CONT {pid}` resumes it, or restart it")
        self.pid = pid


class WorkerNotRpcError(RpcProbeError):
    """Something listens there, but it is not a ggml-rpc-server (it answers what a worker would not)."""


class WorkerSilentError(RpcProbeError):
    """It accepts every connection and answers none: not a ggml-rpc-server, or a hung one.

    A busy worker accepts no further connection once its queue is full; this one does. Our HELLO still
    goes to a keeper (`keeper_pid`), in case it is a worker after all.
    """

    def __init__(self, endpoint: str, message: str, hint: str | None, keeper_pid: int | None) -> None:
        super().__init__(endpoint, message, hint)
        self.keeper_pid = keeper_pid


class _NoAnswerYet(RpcProbeError):
    """HELLO sent, nothing back in time: busy, not a worker, or hung (`_second_opinion` decides)."""


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
    if valid and not 0 < int(port_text) < 65536:
        raise BadInputError(f"RPC endpoint {text!r}: port {int(port_text)} is out of range",
                            "give a port from 1 to 65535, like 192.168.1.5:50052")
    if not valid:
        raise BadInputError(f"RPC endpoint {text!r} is not HOST:PORT",
                            "write it like 192.168.1.5:50052; llama.cpp's --rpc takes an IPv4 address "
                            "or a hostname")
    return host, int(port_text)


def resolve_endpoint(endpoint: str) -> tuple[str, int] | None:
    """The IPv4 address and port a connection to `endpoint` has at both ends, as psutil shows them: resolved as
    llama.cpp resolves it (gethostbyname), 0.0.0.0 being this machine's 127.0.0.1. None where it does not
    resolve or is not HOST:PORT (the probe reports those)."""
    try:
        host, port = parse_endpoint(endpoint)
        address = socket.gethostbyname(host)
    except (OSError, BadInputError):
        return None
    return ("127.0.0.1" if address == "0.0.0.0" else address), port


def probe_worker(endpoint: str, connect_timeout_s: float = 1.0, reply_timeout_s: float = 2.0) -> WorkerReport:
    """Ask one worker for its version, its devices and their free/total memory (<1 ms idle, loopback).

    Raises a `RpcProbeError` subclass naming the endpoint and the case; `WorkerBusyError` when the
    worker is serving another client, `WorkerNotRpcError` when the port answers like something else,
    `WorkerSilentError` when it accepts connections and answers none. Never leaves the worker with an
    unanswered request on a closed socket. `BadInputError` when the endpoint is not HOST:PORT.
    """
    host, port = parse_endpoint(endpoint)
    claim = _Claim.take(endpoint, reply_timeout_s)
    try:
        return _probe(endpoint, host, port, connect_timeout_s, reply_timeout_s, claim)
    finally:
        claim.release()


def _probe(endpoint: str, host: str, port: int, connect_timeout_s: float, reply_timeout_s: float,
           claim: _Claim) -> WorkerReport:
    started = time.monotonic()
    address, sock = _connect(endpoint, host, port, connect_timeout_s, claim.earlier_keeper)
    exchange = _Exchange(endpoint, sock, time.monotonic() + reply_timeout_s)
    try:
        version = _hello(exchange, address, port, reply_timeout_s)
        count = exchange.device_count()
        devices = tuple(exchange.device_memory(index) for index in range(count))
    except (WorkerBusyError, WorkerSilentError) as exc:
        exc.keeper_pid = exchange.abandon(claim)
        raise
    except BaseException:
        exchange.abandon(claim)
        raise
    exchange.close()
    return WorkerReport(endpoint, version, devices, time.monotonic() - started, exchange.fastest_s)


def _hello(exchange: _Exchange, address: str, port: int, reply_timeout_s: float) -> str:
    """HELLO; when it goes unanswered, a second opinion decides: busy, not a worker, or silent."""
    try:
        return exchange.hello()
    except _NoAnswerYet:
        try:
            _second_opinion(exchange.endpoint, address, port, exchange.sock)
        except WorkerNotRpcError:
            exchange.owed_bytes = 0  # not a worker: nothing will answer, so nothing to wait for
            raise
    exchange.deadline = time.monotonic() + reply_timeout_s  # the worker has started to answer after all
    return exchange.hello_reply()


def _second_opinion(endpoint: str, address: str, port: int, pending: socket.socket) -> None:
    """After an unanswered HELLO on `pending`: return when its answer has started to come after all, or
    raise `WorkerBusyError`, `WorkerNotRpcError` or `WorkerSilentError`.

    While our HELLO waits unanswered in a ggml-rpc-server's accept queue, the worker touches no later
    connection (one client at a time, accepted in order): an answer or a hang-up on a second connection
    proves it is something else. And a busy worker's queue (listen backlog 1: two connections) is full
    with ours and the second one, so a third connect goes unaccepted; a server that takes it is no
    busy worker.
    """
    busy_why = "it took the connection but did not answer HELLO, and a worker serves one client at a time"
    second = _try_connect(address, port)
    if second is None:
        raise _busy_error(endpoint, busy_why, None)
    try:
        with contextlib.suppress(OSError):
            second.sendall(_SECOND_OPINION_REQUEST)
        readable, _, _ = select.select([pending, second], [], [], SECOND_OPINION_S)
        if pending in readable:
            return
        if second in readable:
            raise _not_rpc_error(endpoint, second)
        third = _try_connect(address, port)
        if third is None:
            raise _busy_error(endpoint, busy_why, None)
        third.close()  # nothing sent on it: harmless to a worker
        if select.select([pending], [], [], 0.1)[0]:
            return
        raise WorkerSilentError(endpoint, "accepts every connection but answered none: not a ggml-rpc-server, "
                                "or a hung one", "check the port in --rpc and the worker's log; `llamalaunch "
                                "worker` starts workers", None)
    finally:
        _close_with_reset(second)


def _try_connect(address: str, port: int) -> socket.socket | None:
    """A connection within SECOND_OPINION_S, or None (a full accept queue drops the SYN: no answer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(SECOND_OPINION_S)
    try:
        sock.connect((address, port))
    except OSError:
        sock.close()
        return None
    return sock


def _not_rpc_error(endpoint: str, second: socket.socket) -> WorkerNotRpcError:
    try:
        data = second.recv(256)
    except OSError:
        data = b""
    line = data.split(b"\n", 1)[0].decode("latin-1").strip()[:80]
    hint = "check the port in --rpc; start a worker there with `llamalaunch worker`"
    if line.startswith("HTTP/"):
        return WorkerNotRpcError(endpoint, f"not a ggml-rpc-server: it answers HTTP ({line}) and not HELLO",
                                 "check the port in --rpc: that one is a web server's (llama-server's?); "
                                 "start a worker with `llamalaunch worker`")
    if data:
        return WorkerNotRpcError(endpoint, f"not a ggml-rpc-server: it answered a second connection "
                                 f"({line!r}) but not HELLO", hint)
    return WorkerNotRpcError(endpoint, "not a ggml-rpc-server: it did not answer HELLO and hung up on a second "
                             "connection", hint)


def stopped_worker(endpoint: str) -> int | None:
    """The pid of the process listening on `endpoint` on this machine when it is stopped; else None."""
    import psutil

    resolved = resolve_endpoint(endpoint)
    if resolved is None or not _is_this_machine(resolved[0]):  # a remote worker's state is not visible here
        return None
    try:
        listeners = [c.pid for c in psutil.net_connections(kind="tcp4")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.pid
                     and c.laddr.port == resolved[1] and c.laddr.ip in (resolved[0], "0.0.0.0")]
        return next((pid for pid in listeners if psutil.Process(pid).status() == psutil.STATUS_STOPPED), None)
    except (OSError, psutil.Error):
        return None


def _is_this_machine(address: str) -> bool:
    import psutil

    if address.startswith("127."):
        return True
    try:
        return any(entry.address == address for entries in psutil.net_if_addrs().values() for entry in entries)
    except OSError:
        return False


def describe_holder(endpoint: str) -> str:
    """Whom a busy worker serves, as far as this machine can see ("llama-server, pid 4242"); else a guess."""
    return holder_of(endpoint) or "a llama-server?"


def holder_of(endpoint: str, ignore_pids: Collection[int] = ()) -> str | None:
    """The client a worker serves, when this machine can tell and it is not one of `ignore_pids`."""
    import psutil  # only on the busy path: listing every connection takes milliseconds

    resolved = resolve_endpoint(endpoint)
    if resolved is None:
        return None
    address, port = resolved
    try:
        connections = psutil.net_connections(kind="tcp4")
    except (OSError, psutil.Error):
        return None
    established = [c for c in connections if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.raddr]
    # The worker runs here: its own end of the connection it accepted names the client (queued ones have no pid).
    served = [c.raddr for c in established if (c.laddr.ip, c.laddr.port) == (address, port) and c.pid]
    if served:
        peer = (served[0].ip, served[0].port)
        holders = [c.pid for c in established if (c.laddr.ip, c.laddr.port) == peer and c.pid]
        if holders and holders[0] in ignore_pids:
            return None
        return _process_label(holders[0]) if holders else f"a client at {peer[0]}"
    ours = {os.getpid(), *keeper_pids(endpoint), *ignore_pids}
    local = sorted({c.pid for c in established if (c.raddr.ip, c.raddr.port) == (address, port)
                    and c.pid and c.pid not in ours})
    if local:
        return f"connected from here: {'; '.join(_process_label(pid) for pid in local)}"
    return None


def _process_label(pid: int) -> str:
    import psutil

    try:
        return f"{psutil.Process(pid).name()}, pid {pid}"
    except psutil.Error:
        return f"pid {pid}"


class _Claim:
    """This machine's one conversation with a worker at a time: an flock on a file per endpoint.

    A keeper inherits the lock and holds it until it is done, so that a probe never queues a second
    request behind a pending one (a waiter per run, piling up), from this run or any other.
    """

    def __init__(self, path: Path, fd: int | None, earlier_keeper: int | None = None) -> None:
        self.path = path
        self.fd = fd
        self.earlier_keeper = earlier_keeper  # the last probe here left a keeper (now gone)

    @classmethod
    def take(cls, endpoint: str, wait_s: float) -> _Claim:
        """The lock, waiting up to `wait_s` for another probe to finish; busy at once behind a keeper."""
        path = state_dir() / "rpc" / (endpoint.replace(":", "_").replace("/", "_") + ".lock")
        try:
            path.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # private, as write_state makes it
            path.parent.mkdir(exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return cls(path, None)  # no place for a lock: probe unguarded, as before locks
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                keeper = _live_keeper(fd)
                if keeper is not None or time.monotonic() > deadline:
                    os.close(fd)
                    why = "an earlier probe from here still waits for its answer"
                    raise _busy_error(endpoint, why if keeper else "another probe from here is talking to it",
                                      keeper) from None
                time.sleep(0.01)
        earlier = _keeper_named(fd)
        cls._write(fd, f"probe {os.getpid()}")
        return cls(path, fd, earlier)

    @staticmethod
    def _write(fd: int, text: str) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)

    def pass_to(self, keeper_pid: int) -> None:
        """The keeper holds the lock now (it inherited the descriptor); ours goes."""
        if self.fd is not None:
            self._write(self.fd, f"keeper {keeper_pid}")
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _keeper_named(fd: int) -> int | None:
    """The keeper pid the lock file names (it handed the last probe's request to one), if any."""
    try:
        kind, _, pid_text = os.pread(fd, 64, 0).decode().partition(" ")
        return int(pid_text) if kind == "keeper" else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _live_keeper(fd: int) -> int | None:
    """The keeper pid the lock file names, when that process still runs."""
    pid = _keeper_named(fd)
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _connect(endpoint: str, host: str, port: int, timeout_s: float,
             earlier_keeper: int | None = None) -> tuple[str, socket.socket]:
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
                                 start_worker_hint(host, port, address)) from None
    except TimeoutError:
        sock.close()
        if keepers := keeper_pids(endpoint):
            # Its accept queue (listen backlog 1) is full of earlier probes still waiting: busy, not gone.
            raise _busy_error(endpoint, f"earlier probes still wait for their answers (pids "
                              f"{', '.join(map(str, keepers))}) and fill its queue", keepers[0]) from None
        if earlier_keeper is not None:
            # A connection stays in the accept queue until the worker takes it, even after we reset it.
            raise _busy_error(endpoint, "its queue is still full of earlier probes' connections, which it "
                              "takes once its client leaves", None) from None
        raise WorkerUnreachableError(endpoint, f"no answer to the connection within {timeout_s:g} s",
                                     "check the host is up and its firewall; a worker whose queue of "
                                     "waiting clients is full also drops connects") from None
    except OSError as exc:
        sock.close()
        raise WorkerUnreachableError(endpoint, f"cannot connect: {exc.strerror or exc}",
                                     "check the address and the network route") from None
    return address, sock


def start_worker_hint(host: str, port: int, address: str | None = None) -> str:
    """How to start a worker there: llamalaunch's own command, listening where --rpc looks for it (`address`:
    the host resolved; worker's --host takes an IPv4 address, not a name).

    A worker has no authentication: it listens on loopback unless the user's --rpc names another address.
    """
    command = f"llamalaunch worker --port-base {port}"
    address = address or host
    if host == "localhost" or address.startswith("127."):
        return f"start one with `{command}` (on loopback), or fix the port in --rpc"
    return f"start one on {host} with `{command} --host {address}` (reachable from the network: keep it on a " \
           "trusted one), or fix the address in --rpc"


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
        """Send HELLO and read its answer; `_NoAnswerYet` when nothing came in time (see `hello_reply`)."""
        self._request(CMD_HELLO, _HELLO_REQUEST, _HELLO_REPLY.size)
        return self.hello_reply()

    def hello_reply(self) -> str:
        reply = self._reply(CMD_HELLO, _HELLO_REPLY.size)
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
        self._request(cmd, payload, reply_size)
        reply = self._reply(cmd, reply_size)
        if cmd != CMD_HELLO:
            elapsed = time.perf_counter() - started
            self.fastest_s = elapsed if self.fastest_s is None else min(self.fastest_s, elapsed)
        return reply

    def _request(self, cmd: int, payload: bytes, reply_size: int) -> None:
        self._send(_REQUEST_HEADER.pack(cmd, len(payload)) + payload)
        self.owed_bytes = _REPLY_HEADER.size + reply_size

    def _reply(self, cmd: int, reply_size: int) -> bytes:
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
        except TimeoutError:
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
            except TimeoutError:
                raise self._timeout_error(started=got > 0) from None
            if not chunk:
                raise self._closed_error(got, size)
            chunks.append(chunk)
            got += len(chunk)
            self.owed_bytes -= len(chunk)
        return b"".join(chunks)

    def _reset_error(self) -> RpcProbeError:
        self.owed_bytes = 0
        if not self.accepted:  # before any answer: as likely no ggml-rpc-server at all as a crashed one
            return WorkerResetError(self.endpoint, "reset the connection at HELLO, before any answer",
                                    "check that a ggml-rpc-server of this llama.cpp version listens there, "
                                    "and its log")
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
            return _NoAnswerYet(self.endpoint, "no answer to HELLO yet")
        return WorkerStalledError(self.endpoint, "stopped answering in the middle of the probe",
                                  "the worker may be hung: look at its log and restart it")

    def close(self) -> None:
        """Normal end: nothing owed, so the worker reads EOF where it waits for a command and moves on."""
        self.sock.close()

    def abandon(self, claim: _Claim | None = None) -> int | None:
        """End after an error: never close on a request the worker will still answer; the keeper's pid."""
        if self.owed_bytes > 0:
            return _hand_off(self.sock, self.owed_bytes, self.endpoint, claim)
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


def _hand_off(sock: socket.socket, owed_bytes: int, endpoint: str, claim: _Claim | None) -> int | None:
    """Give the socket (and the endpoint's lock) to a detached keeper process; returns its pid (None: a
    thread of ours keeps it)."""
    sock.setblocking(True)
    claim = claim or _Claim(Path(), None)
    lock_fds = (claim.fd,) if claim.fd is not None else ()
    try:
        keeper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _KEEPER_CODE, str(sock.fileno()), str(owed_bytes),
             str(KEEP_PENDING_S), endpoint],
            pass_fds=(sock.fileno(), *lock_fds), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd="/", start_new_session=True)
    except OSError:
        # Cannot spawn: keep it in this process instead (safe until this process exits).
        lock_fd, claim.fd = claim.fd, None
        threading.Thread(target=_keep_in_thread, args=(sock, owed_bytes, lock_fd), daemon=True,
                         name="rpc-keeper").start()
        return None
    sock.close()  # the keeper holds its own reference: no FIN goes out
    claim.pass_to(keeper.pid)
    with _keepers_lock:
        for started in _keepers.values():
            started[:] = [other for other in started if other.poll() is None]  # reaps finished ones
        _keepers.setdefault(endpoint, []).append(keeper)
    return keeper.pid


def _keep_in_thread(sock: socket.socket, owed_bytes: int, lock_fd: int | None) -> None:
    try:
        _keep_until_answered(sock, owed_bytes, KEEP_PENDING_S)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


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


_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (syscalls from 5.x share one table)


def reset_when_closed(pid: int, endpoints: Sequence[str]) -> int:
    """Make the connections process `pid` holds to these workers close with a reset (RST), not FIN, when
    it exits; returns how many were switched (0 where the kernel does not let us: not Linux, no
    pidfd_getfd, not permitted).

    Killing a client that a worker still owes an answer (llama-server's HELLO queued at a busy worker, a
    compute in flight) closes its socket with FIN: the worker writes the answer later and dies of SIGPIPE.
    After a reset that write fails with ECONNRESET and the worker goes on to its next client.
    """
    import psutil

    addresses = {address for endpoint in endpoints if (address := resolve_endpoint(endpoint)) is not None}
    try:
        held = [c.fd for c in psutil.Process(pid).net_connections(kind="tcp4")
                if c.raddr and (c.raddr.ip, c.raddr.port) in addresses and c.fd >= 0]
    except psutil.Error:
        return 0
    if not held or not hasattr(os, "pidfd_open"):
        return 0
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return 0
    try:
        return sum(_reset_their_socket(pidfd, fd) for fd in held)
    finally:
        os.close(pidfd)


def _reset_their_socket(pidfd: int, their_fd: int) -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ours = libc.syscall(_SYS_PIDFD_GETFD, pidfd, their_fd, 0)
    if ours < 0:
        return False
    sock = socket.socket(fileno=ours)  # the same socket as theirs: its options are theirs
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True
    except OSError:
        return False
    finally:
        sock.close()  # only our descriptor: the socket lives on in their process until it exits
