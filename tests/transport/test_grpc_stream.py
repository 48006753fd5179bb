"""Tests for the gRPC byte-stream transport: chunking, lifecycle, limits and dying clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from silotune.transport.base import (
    Connection,
    ConnectionClosed,
    MessageTooLarge,
    TransportError,
    TransportTimeout,
)
from silotune.transport.grpc_stream import (
    CLIENT_ID_KEY,
    METHOD,
    GrpcStreamServer,
    Reassembler,
    connect,
    iter_chunks,
)

SMALL_CHUNK = 4096  # many chunks per message without slow tests


class Recorder:
    """A server handler that echoes every message and records how each connection ended."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ended: dict[str, BaseException] = {}
        self.received: dict[str, list[bytes]] = {}
        self.done = threading.Event()

    def __call__(self, conn: Connection) -> None:
        try:
            while True:
                message = conn.recv(timeout=10)
                with self.lock:
                    self.received.setdefault(conn.peer.split("@")[0], []).append(message)
                conn.send(message)
        except ConnectionClosed as exc:
            with self.lock:
                self.ended[conn.peer.split("@")[0]] = exc
            self.done.set()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(recorder: Recorder) -> Iterator[GrpcStreamServer]:
    srv = GrpcStreamServer(recorder, insecure=True, chunk_bytes=SMALL_CHUNK, max_connections=4)
    srv.start()
    yield srv
    srv.stop(0)


def _client(server: GrpcStreamServer, name: str, **kwargs: object) -> Connection:
    kwargs.setdefault("chunk_bytes", SMALL_CHUNK)
    return connect(server.target, insecure=True, client_id=name, timeout=5, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 1000])
def test_chunks_reassemble_to_the_message(size: int) -> None:
    data = os.urandom(size)
    chunks = list(iter_chunks(7, data, 100))
    assert len(chunks) == max(1, -(-size // 100))
    reassembler = Reassembler(10_000)
    results = [reassembler.feed(chunk) for chunk in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == data
    assert not reassembler.partial


def test_reassembler_rejects_out_of_order_and_interleaved_chunks() -> None:
    first, second, _ = iter_chunks(1, b"x" * 250, 100)
    reassembler = Reassembler(10_000)
    with pytest.raises(TransportError, match="Chunk 1 of message 1 arrived while chunk 0"):
        reassembler.feed(second)
    reassembler = Reassembler(10_000)
    reassembler.feed(first)
    other = next(iter_chunks(2, b"y" * 250, 100))
    with pytest.raises(TransportError, match="message 2 arrived while chunk 1 of message 1"):
        reassembler.feed(other)


def test_reassembler_refuses_a_message_over_the_limit_while_it_grows() -> None:
    reassembler = Reassembler(250)
    chunks = iter_chunks(0, b"z" * 10_000, 100)
    reassembler.feed(next(chunks))
    reassembler.feed(next(chunks))
    with pytest.raises(TransportError, match="exceeds the maximum message size of 250"):
        reassembler.feed(next(chunks))


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        (b"\x01\x00", "shorter than its header"),
        (b"\x09" + bytes(13), "version 9"),
        (b"\x01" + bytes(12) + b"\x06", "unknown flags"),
    ],
)
def test_reassembler_rejects_malformed_chunks(chunk: bytes, match: str) -> None:
    with pytest.raises(TransportError, match=match):
        Reassembler(100).feed(chunk)


# --------------------------------------------------------------------------- exchange


def test_messages_round_trip_whole_and_in_order(server: GrpcStreamServer) -> None:
    messages = [b"", b"a", os.urandom(SMALL_CHUNK), os.urandom(5 * SMALL_CHUNK + 3)]
    with _client(server, "silo-a") as client:
        for message in messages:
            client.send(message)
        assert [client.recv(timeout=5) for _ in messages] == messages


def test_client_id_travels_as_metadata(server: GrpcStreamServer, recorder: Recorder) -> None:
    with _client(server, "silo-7") as client:
        client.send(b"hi")
        assert client.recv(timeout=5) == b"hi"
    assert list(recorder.received) == ["silo-7"]


def test_recv_timeout_keeps_the_stream_usable(server: GrpcStreamServer) -> None:
    with _client(server, "slow") as client:
        with pytest.raises(TransportTimeout, match="within 0.05 s"):
            client.recv(timeout=0.05)
        client.send(b"after")
        assert client.recv(timeout=5) == b"after"


def test_chunk_size_is_negotiated_down_to_what_the_peer_accepts(recorder: Recorder) -> None:
    message = os.urandom(200_000)
    with GrpcStreamServer(recorder, insecure=True, chunk_bytes=65_536) as srv:
        # The client accepts only 8 KiB gRPC messages; the server must chunk its reply to fit.
        with connect(srv.target, insecure=True, chunk_bytes=8192, timeout=5) as client:
            client.send(message)
            assert client.recv(timeout=5) == message


def test_sender_refuses_a_message_over_its_limit(server: GrpcStreamServer) -> None:
    with _client(server, "big", max_message_bytes=1000) as client:
        with pytest.raises(MessageTooLarge, match="1001 bytes exceeds the maximum of 1000"):
            client.send(b"x" * 1001)
        client.send(b"x" * 1000)
        assert client.recv(timeout=5) == b"x" * 1000


def test_receiver_drops_a_peer_that_sends_too_much(recorder: Recorder) -> None:
    with GrpcStreamServer(
        recorder, insecure=True, chunk_bytes=SMALL_CHUNK, max_message_bytes=10_000
    ) as srv:
        client = connect(srv.target, insecure=True, chunk_bytes=SMALL_CHUNK, client_id="greedy")
        with pytest.raises(ConnectionClosed, match="exceeds the maximum message size of 10000"):
            client.send(b"y" * 50_000)  # raises here or in recv, whichever notices first
            client.recv(timeout=5)
        client.close()
        assert recorder.done.wait(5)
        assert "exceeds the maximum message size" in str(recorder.ended["greedy"])


# --------------------------------------------------------------------------- lifecycle


def test_client_close_reaches_the_handler(server: GrpcStreamServer, recorder: Recorder) -> None:
    client = _client(server, "leaver")
    client.send(b"one")
    assert client.recv(timeout=5) == b"one"
    client.close()
    client.close()  # idempotent
    assert recorder.done.wait(5)
    assert isinstance(recorder.ended["leaver"], ConnectionClosed)
    assert wait_for(lambda: server.active_connections == 0)
    with pytest.raises(ConnectionClosed):
        client.send(b"two")
    with pytest.raises(ConnectionClosed):
        client.recv(timeout=1)


def test_server_close_delivers_pending_messages_first() -> None:
    def farewell(conn: Connection) -> None:
        conn.send(b"result")
        conn.send(b"bye")  # the handler returns: the server closes the stream

    with GrpcStreamServer(farewell, insecure=True) as srv, connect(srv.target, insecure=True) as c:
        assert c.recv(timeout=5) == b"result"
        assert c.recv(timeout=5) == b"bye"
        with pytest.raises(ConnectionClosed, match="the peer ended the stream"):
            c.recv(timeout=5)


def test_handler_crash_closes_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    def handler(conn: Connection) -> None:
        while True:
            message = conn.recv()
            if message == b"crash":
                raise RuntimeError("handler bug")
            conn.send(message)

    with GrpcStreamServer(handler, insecure=True) as srv:
        bad = connect(srv.target, insecure=True, client_id="bad")
        good = connect(srv.target, insecure=True, client_id="good")
        bad.send(b"crash")
        with pytest.raises(ConnectionClosed):
            bad.recv(timeout=5)
        good.send(b"fine")
        assert good.recv(timeout=5) == b"fine"
        bad.close()
        good.close()
    assert "Handler for connection from bad@" in caplog.text


def test_server_stop_closes_live_connections(recorder: Recorder) -> None:
    srv = GrpcStreamServer(recorder, insecure=True)
    srv.start()
    client = connect(srv.target, insecure=True, client_id="stays")
    client.send(b"x")
    assert client.recv(timeout=5) == b"x"
    srv.stop(0)
    assert srv.active_connections == 0
    assert isinstance(recorder.ended["stays"], ConnectionClosed)
    with pytest.raises(ConnectionClosed):
        client.recv(timeout=5)
    client.close()


def test_connections_over_the_limit_are_refused(recorder: Recorder) -> None:
    with GrpcStreamServer(recorder, insecure=True, max_connections=1) as srv:
        with connect(srv.target, insecure=True, timeout=5):
            with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED"):
                connect(srv.target, insecure=True, timeout=5)


def test_connect_without_a_server_fails_fast_and_clearly() -> None:
    with GrpcStreamServer(lambda conn: None, insecure=True) as srv:
        free_target = srv.target
    start = time.monotonic()
    with pytest.raises(TransportError, match=f"Cannot open a byte stream to {free_target}"):
        connect(free_target, insecure=True, timeout=5)
    assert time.monotonic() - start < 4


def test_connect_to_a_silent_server_times_out() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # completes TCP handshakes but never speaks HTTP/2
    try:
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TransportError, match=f"No answer from {target} within 0.5 s"):
            connect(target, insecure=True, timeout=0.5)
        assert time.monotonic() - start < 3
    finally:
        silent.close()


def test_connect_to_a_foreign_grpc_server_is_rejected() -> None:
    foreign = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(1))
    port = foreign.add_insecure_port("127.0.0.1:0")
    foreign.start()
    try:
        with pytest.raises(TransportError, match="UNIMPLEMENTED"):
            connect(f"127.0.0.1:{port}", insecure=True, timeout=5)
    finally:
        foreign.stop(0)


def test_tls_or_insecure_must_be_chosen_explicitly() -> None:
    with pytest.raises(ValueError, match="tls=TlsMaterial"):
        GrpcStreamServer(lambda conn: None)
    with pytest.raises(ValueError, match="tls=TlsMaterial"):
        connect("127.0.0.1:1")
    with pytest.raises(ValueError, match="chunk_bytes"):
        connect("127.0.0.1:1", insecure=True, chunk_bytes=10)
    with pytest.raises(ValueError, match="printable ASCII"):
        connect("127.0.0.1:1", insecure=True, client_id="silo\n1")


# --------------------------------------------------------------------------- dying clients


def _keep_exchanging(client: Connection, rounds: int) -> None:
    for i in range(rounds):
        message = f"round {i}".encode() * 1000  # several chunks each
        client.send(message)
        assert client.recv(timeout=5) == message


def test_client_cancelled_mid_message_does_not_disturb_others(
    server: GrpcStreamServer, recorder: Recorder
) -> None:
    good = _client(server, "good")
    _keep_exchanging(good, 2)

    # A raw client that sends the first chunk of a three-chunk message and then dies.
    channel = grpc.insecure_channel(server.target)
    release = threading.Event()

    def requests() -> Iterator[bytes]:
        yield next(iter_chunks(0, b"q" * (3 * SMALL_CHUNK), SMALL_CHUNK))
        release.wait(10)

    call = channel.stream_stream(METHOD)(requests(), metadata=((CLIENT_ID_KEY, "victim"),))
    assert call.initial_metadata() is not None  # the server accepted the stream
    time.sleep(0.3)  # let the server take in the partial message
    _keep_exchanging(good, 2)
    call.cancel()
    release.set()
    channel.close()

    assert recorder.done.wait(5)
    error = recorder.ended["victim"]
    assert isinstance(error, ConnectionClosed)
    assert "in the middle of a message" in str(error)
    assert "victim" not in recorder.received  # the partial message was never delivered
    _keep_exchanging(good, 3)
    good.close()
    assert wait_for(lambda: server.active_connections == 0)


KILLED_CLIENT = """
import sys, time
from silotune.transport.grpc_stream import connect
conn = connect(sys.argv[1], insecure=True, client_id="killed", chunk_bytes=4096)
conn.send(b"ping")
assert conn.recv(timeout=5) == b"ping"
print("ready", flush=True)
conn.send(b"k" * (64 * 2**20))  # blocks under flow control until the process is killed
"""


def test_killed_client_process_does_not_disturb_others(
    server: GrpcStreamServer, recorder: Recorder
) -> None:
    good = _client(server, "good")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, server.target],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        _keep_exchanging(good, 2)
        time.sleep(0.2)  # the big message is now streaming in
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert recorder.done.wait(10)
    assert isinstance(recorder.ended["killed"], ConnectionClosed)
    assert recorder.received["killed"] == [b"ping"]
    _keep_exchanging(good, 3)
    good.close()
