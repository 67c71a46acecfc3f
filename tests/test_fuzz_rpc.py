"""Fuzzing the RPC probe's reply parsing (issue 11): whatever bytes a worker sends, only the RpcProbeError
family comes out, each a one-line message naming the endpoint, and memory stays bounded.

Two paths, both the probe's own code:
- fast: `rpc._Exchange`, the probe's parser, driven as `probe_worker` drives it, over a socketpair that
  holds the fuzzed reply stream and then EOF (LLAMALAUNCH_FUZZ_EXAMPLES cases, default 10,000);
- whole: `probe_worker` itself against a loopback server of the test's own that answers every
  connection with the fuzzed bytes (LLAMALAUNCH_FUZZ_SOCKET_EXAMPLES, default 500).
Seeds are replies captured from a real ggml-rpc-server; `test_seed_matches_a_real_worker` re-captures them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llamalaunch.probe import rpc
from llamalaunch.probe.rpc import RpcProbeError, WorkerDevice, WorkerReplyError, probe_worker
from llamalaunch.units import MAX_SIZE_BYTES
from tests.support import RpcWorker, free_port, wait_for_port

FUZZ_EXAMPLES = int(os.environ.get("LLAMALAUNCH_FUZZ_EXAMPLES", "10000"))
SOCKET_EXAMPLES = int(os.environ.get("LLAMALAUNCH_FUZZ_SOCKET_EXAMPLES", "500"))
ENDPOINT = "127.0.0.1:50052"  # the label the fast path's errors must name

# What a real ggml-rpc-server (llama.cpp of the pinned llama-cpp-python 0.3.36, `-d CPU,CPU`, 24 GiB host)
# wrote to the probe, reply by reply: HELLO (v7.0.0, no caps), DEVICE_COUNT (2), GET_DEVICE_MEMORY 0 and 1.
REAL_HELLO = bytes.fromhex("1c00000000000000" "07000000" + "00" * 24)
REAL_COUNT = bytes.fromhex("0400000000000000" "02000000")
REAL_MEMORY = bytes.fromhex("1000000000000000" "00d098e205000000" "00d098e205000000")
REAL_SESSION = REAL_HELLO + REAL_COUNT + REAL_MEMORY + REAL_MEMORY
SEEDS = (REAL_SESSION, REAL_HELLO + bytes.fromhex("0400000000000000" "01000000") + REAL_MEMORY, REAL_HELLO,
         REAL_HELLO + REAL_COUNT)


# --- driving the probe's parser ---------------------------------------------------------------------


def converse(sock: socket.socket, endpoint: str = ENDPOINT) -> tuple[str, tuple[WorkerDevice, ...]]:
    """What probe_worker does once connected (rpc.probe_worker): HELLO, count, each device's memory;
    after an error the exchange is abandoned as the probe abandons it."""
    exchange = rpc._Exchange(endpoint, sock, time.monotonic() + 2.0)
    try:
        version = exchange.hello()
        count = exchange.device_count()
        devices = tuple(exchange.device_memory(index) for index in range(count))
    except BaseException:
        exchange.abandon()
        raise
    exchange.close()
    return version, devices


def probe_bytes(replies: bytes) -> tuple[str, tuple[WorkerDevice, ...]]:
    """The worker's side is `replies` and then EOF; the requests the probe writes are never read."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(replies)
        theirs.shutdown(socket.SHUT_WR)
        return converse(ours)
    finally:
        ours.close()
        theirs.close()


class Tally:
    """Outcomes by kind; anything but a probe error or a sane report fails the test where it happens."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def check(self, run: Callable[[], tuple[str, tuple[WorkerDevice, ...]]], endpoint: str) -> None:
        try:
            version, devices = run()
        except RpcProbeError as error:
            message = str(error)
            assert "\n" not in message and endpoint in message, message
            self.counts[type(error).__name__] += 1
            return
        assert version.startswith(f"{rpc.RPC_PROTO_MAJOR}.0."), version
        assert 1 <= len(devices) <= rpc.MAX_DEVICES_PER_WORKER
        assert [d.index for d in devices] == list(range(len(devices)))
        assert all(0 <= d.free_bytes <= MAX_SIZE_BYTES and 0 <= d.total_bytes <= MAX_SIZE_BYTES for d in devices)
        self.counts["report"] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{kind} {count}" for kind, count in self.counts.most_common())


def no_keepers_started() -> bool:
    """Every fuzzed stream ends in EOF: nothing is owed, so no socket may go to a keeper process."""
    return not any(rpc._keepers.values())


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():  # shown in CI's log even with output captured
        print(f"\n{line}")


# --- strategies -----------------------------------------------------------------------------------


def frame(payload: bytes, size: int | None = None) -> bytes:
    return struct.pack("<Q", len(payload) if size is None else size) + payload


U64_EDGES = [0, 1, 4, 12, 16, 28, 2**31, 2**32 - 1, 2**32, MAX_SIZE_BYTES, MAX_SIZE_BYTES + 1, 2**63, 2**64 - 1]
U32_EDGES = [0, 1, 2, rpc.MAX_DEVICES_PER_WORKER, rpc.MAX_DEVICES_PER_WORKER + 1, 2**31, 2**32 - 1]
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
u32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))
size_field = st.one_of(st.none(), st.none(), u64)  # mostly the right size, sometimes any


@st.composite
def framed_sessions(draw: st.DrawFn) -> bytes:
    """Well-framed replies with fuzzed fields: reaches the version, count and size checks."""
    version = draw(st.one_of(st.sampled_from([(7, 0, 0), (7, 0, 9), (7, 1, 0), (8, 0, 0), (6, 9, 9), (0, 0, 0)]),
                             st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))))
    hello = bytes(version) + bytes([draw(st.integers(0, 255))]) + draw(st.binary(min_size=24, max_size=24))
    count = draw(u32)
    memories = draw(st.lists(st.tuples(u64, u64), max_size=4))
    stream = frame(hello, draw(size_field)) + frame(struct.pack("<I", count), draw(size_field))
    stream += b"".join(frame(struct.pack("<QQ", free, total), draw(size_field)) for free, total in memories)
    cut = draw(st.one_of(st.none(), st.integers(0, len(stream))))
    return stream if cut is None else stream[:cut]


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Each edit: (kind, position, value). 0: set a byte, 1: write a u64, 2: write a u32, 3: cut,
    4: duplicate a span, 5: delete a byte."""
    buffer = bytearray(data)
    for kind, position, value in edits:
        if not buffer:
            break
        at = position % len(buffer)
        if kind == 0:
            buffer[at] = value & 0xFF
        elif kind == 1:
            buffer[at : at + 8] = struct.pack("<Q", value % 2**64)
        elif kind == 2:
            buffer[at : at + 4] = struct.pack("<I", value % 2**32)
        elif kind == 3:
            del buffer[at:]
        elif kind == 4:
            buffer[at:at] = buffer[at : at + value % 64]
        else:
            del buffer[at]
    return bytes(buffer)


mutated_seeds = st.builds(mutate, st.sampled_from(SEEDS),
                          st.lists(st.tuples(st.integers(0, 5), st.integers(0, 255), u64), min_size=1, max_size=6))
reply_streams = st.one_of(framed_sessions(), mutated_seeds, st.binary(max_size=160))


def with_each_outcome(test: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Explicit examples first, so that even a short run (LLAMALAUNCH_FUZZ_EXAMPLES=100) sees every outcome."""
    for replies in (REAL_SESSION, frame(bytes([8, 0, 0, 0]) + bytes(24)), REAL_HELLO[:10], b"HTTP/1.1 400"):
        test = example(replies)(test)
    return test


# --- tests ----------------------------------------------------------------------------------------


def test_real_seed_parses_as_the_worker_it_came_from() -> None:
    version, devices = probe_bytes(REAL_SESSION)
    assert version == "7.0.0"
    assert devices == (WorkerDevice(0, 25276502016, 25276502016), WorkerDevice(1, 25276502016, 25276502016))


def test_fuzz_reply_parser(capsys: pytest.CaptureFixture[str]) -> None:
    tally = Tally()
    started = time.monotonic()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(reply_streams)
    @with_each_outcome
    def fuzz(replies: bytes) -> None:
        tally.check(lambda replies=replies: probe_bytes(replies), ENDPOINT)

    fuzz()
    report(capsys, f"RPC reply fuzz (hypothesis, parser over socketpair): {tally.total} cases in "
                   f"{time.monotonic() - started:.1f} s, 0 crashes; {tally.summary()}")
    assert tally.total >= FUZZ_EXAMPLES * 0.95  # hypothesis may stop a little early when it runs out of ideas
    # Every outcome EOF can give: reply, closed and version errors, and whole reports (resets and
    # timeouts need a live peer: the fake worker's cases in test_probe_rpc).
    assert tally.counts["report"] > 0 and len(tally.counts) >= 4
    assert no_keepers_started()


def test_memory_stays_bounded_over_many_mutations(capsys: pytest.CaptureFixture[str]) -> None:
    """Seeded random mutations and blobs, without hypothesis (whose own bookkeeping grows by ~100 MiB):
    the parser's traced memory peaks at a few KiB and nothing is kept between cases."""
    rng = random.Random(11)
    tally = Tally()
    cases = 2 * FUZZ_EXAMPLES
    tracemalloc.start()
    try:
        for case in range(cases):
            if case % 2:
                edits = [(rng.randrange(6), rng.randrange(256), rng.choice([rng.randrange(2**64), *U64_EDGES]))
                         for _ in range(rng.randrange(1, 6))]
                replies = mutate(rng.choice(SEEDS), edits)
            else:
                replies = rng.randbytes(rng.randrange(160))
            tally.check(lambda replies=replies: probe_bytes(replies), ENDPOINT)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    report(capsys, f"RPC reply fuzz (seeded mutations): {tally.total} cases, 0 crashes, traced peak "
                   f"{peak / 1024:.0f} KiB, kept {kept / 1024:.0f} KiB; {tally.summary()}")
    assert peak < 256 * 1024 and kept < 64 * 1024
    assert no_keepers_started()


class LoopbackReplies:
    """A listener of the test's own: each connection gets `replies`, then EOF; it reads until the client
    leaves, so that the probe's requests never meet a closed socket (no RST racing the data)."""

    def __init__(self) -> None:
        self.replies = b""
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.settimeout(5)
                conn.sendall(self.replies)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def loopback() -> Iterator[LoopbackReplies]:
    server = LoopbackReplies()
    yield server
    server.close()


def test_fuzz_probe_worker_over_loopback(loopback: LoopbackReplies, capsys: pytest.CaptureFixture[str]) -> None:
    tally = Tally()
    started = time.monotonic()

    @settings(max_examples=SOCKET_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(reply_streams)
    @with_each_outcome
    def fuzz(replies: bytes) -> None:
        loopback.replies = replies
        began = time.monotonic()
        tally.check(lambda: _as_tuple(probe_worker(loopback.endpoint, reply_timeout_s=2.0)), loopback.endpoint)
        assert time.monotonic() - began < 1.5  # EOF ends every case at once: no waiting on a timeout

    fuzz()
    report(capsys, f"RPC reply fuzz (probe_worker, loopback TCP): {tally.total} cases in "
                   f"{time.monotonic() - started:.1f} s, 0 crashes; {tally.summary()}")
    assert tally.total >= SOCKET_EXAMPLES * 0.95 and tally.counts["report"] > 0
    assert no_keepers_started()


def _as_tuple(report: rpc.WorkerReport) -> tuple[str, tuple[WorkerDevice, ...]]:
    return report.version, report.devices


def test_claimed_sizes_are_never_allocated() -> None:
    """Replies announcing up to 2^64-1 bytes, and counts up to 2^32-1 devices: refused before reading."""
    claims = [frame(b"", size) for size in U64_EDGES if size != 28]
    counts = [REAL_HELLO + frame(struct.pack("<I", count)) for count in U32_EDGES if 0 < count <= 2**20]
    tracemalloc.start()
    try:
        for replies in [*claims, *counts] * 20:
            with contextlib.suppress(RpcProbeError):
                probe_bytes(replies)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    with pytest.raises(WorkerReplyError, match="claims 4294967295 devices"):
        probe_bytes(REAL_HELLO + frame(struct.pack("<I", 2**32 - 1)))


# --- the seeds are real ---------------------------------------------------------------------------


def record_session(endpoint: str) -> tuple[bytes, bytes, list[bytes]]:
    """Speak the protocol to a real worker and keep each reply's bytes exactly as they came."""
    host, port = rpc.parse_endpoint(endpoint)
    with socket.create_connection((host, port), timeout=5) as sock:

        def call(cmd: int, payload: bytes, reply_size: int) -> bytes:
            sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
            data = b""
            while len(data) < 8 + reply_size:
                chunk = sock.recv(8 + reply_size - len(data))
                assert chunk, f"worker hung up after {data!r}"
                data += chunk
            return data

        hello = call(rpc.CMD_HELLO, bytes(24), 28)
        count = call(rpc.CMD_DEVICE_COUNT, b"", 4)
        memories = [call(rpc.CMD_GET_DEVICE_MEMORY, struct.pack("<I", index), 16)
                    for index in range(struct.unpack("<I", count[8:])[0])]
    return hello, count, memories


@pytest.mark.llama
def test_seed_matches_a_real_worker(llama_bin_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(llama_bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                    "-t", "1", "-d", "CPU,CPU"], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    worker = RpcWorker(process, port, log_path)
    try:
        wait_for_port(port)
        hello, count, memories = record_session(worker.endpoint)
        real = probe_worker(worker.endpoint)
    finally:
        worker.stop()
    assert (hello, count) == (REAL_HELLO, REAL_COUNT)
    assert len(memories) == 2 and all(m[:8] == REAL_MEMORY[:8] for m in memories)  # values are this host's
    version, devices = probe_bytes(hello + count + b"".join(memories))
    assert (version, devices) == (real.version, real.devices)
