"""Tests for the in-process transport and the shared handler-thread runner."""

from __future__ import annotations

import threading
import time

import pytest

from silotune.transport.base import (
    Connection,
    ConnectionClosed,
    MessageTooLarge,
    TransportError,
    TransportTimeout,
)
from silotune.transport.inprocess import InProcessServer, inprocess_pair


def test_pair_endpoints_satisfy_the_protocol() -> None:
    a, b = inprocess_pair()
    assert isinstance(a, Connection) and isinstance(b, Connection)
    assert (a.peer, b.peer) == ("b", "a")


def test_messages_arrive_whole_and_in_order_both_ways() -> None:
    a, b = inprocess_pair()
    for i in range(100):
        a.send(bytes([i]) * i)
    b.send(b"pong")
    assert [b.recv(timeout=1) for _ in range(100)] == [bytes([i]) * i for i in range(100)]
    assert a.recv(timeout=1) == b"pong"


def test_sent_buffers_are_copied() -> None:
    a, b = inprocess_pair()
    buf = bytearray(b"abc")
    a.send(buf)
    buf[:] = b"xyz"
    assert b.recv(timeout=1) == b"abc"


def test_send_rejects_non_bytes() -> None:
    a, _ = inprocess_pair()
    with pytest.raises(TypeError, match="bytes"):
        a.send("text")  # type: ignore[arg-type]


def test_recv_timeout_leaves_the_connection_usable() -> None:
    a, b = inprocess_pair()
    start = time.monotonic()
    with pytest.raises(TransportTimeout):
        b.recv(timeout=0.05)
    assert time.monotonic() - start >= 0.04
    a.send(b"late")
    assert b.recv(timeout=1) == b"late"


def test_close_wakes_a_blocked_recv_on_the_other_side() -> None:
    a, b = inprocess_pair()
    raised: list[BaseException] = []

    def reader() -> None:
        try:
            b.recv()
        except ConnectionClosed as exc:
            raised.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.05)
    a.close()
    thread.join(2)
    assert not thread.is_alive()
    assert len(raised) == 1


def test_messages_sent_before_close_are_delivered_then_closed() -> None:
    a, b = inprocess_pair()
    a.send(b"1")
    a.send(b"2")
    a.close()
    assert b.recv(timeout=1) == b"1"
    assert b.recv(timeout=1) == b"2"
    for _ in range(2):  # stays closed
        with pytest.raises(ConnectionClosed):
            b.recv(timeout=1)
    with pytest.raises(ConnectionClosed):
        b.send(b"x")
    with pytest.raises(ConnectionClosed):
        a.recv(timeout=1)
    a.close()  # idempotent


def test_oversized_message_is_rejected_by_the_sender() -> None:
    a, b = inprocess_pair(max_message_bytes=10)
    with pytest.raises(MessageTooLarge, match="11 bytes exceeds the maximum of 10"):
        a.send(b"x" * 11)
    a.send(b"x" * 10)
    assert b.recv(timeout=1) == b"x" * 10


def _echo(conn: Connection) -> None:
    while True:
        conn.send(conn.recv())


def test_server_runs_one_handler_per_connection_concurrently() -> None:
    with InProcessServer(_echo) as server:
        clients = [server.connect(f"silo{i}") for i in range(3)]
        for i, client in enumerate(clients):
            client.send(f"hi {i}".encode())
        assert [c.recv(timeout=2) for c in clients] == [b"hi 0", b"hi 1", b"hi 2"]
        assert server.active_connections == 3
        clients[0].close()
        clients[1].send(b"still here")
        assert clients[1].recv(timeout=2) == b"still here"
        deadline = time.monotonic() + 2
        while server.active_connections > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.active_connections == 2
    # stop() closed the remaining server ends
    with pytest.raises(ConnectionClosed):
        clients[2].recv(timeout=2)
    assert server.active_connections == 0


def test_handler_failure_closes_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    def handler(conn: Connection) -> None:
        if conn.recv() == b"boom":
            raise RuntimeError("handler bug")
        _echo(conn)

    with InProcessServer(handler) as server:
        bad, good = server.connect("bad"), server.connect("good")
        bad.send(b"boom")
        with pytest.raises(ConnectionClosed):
            bad.recv(timeout=2)
        good.send(b"ok")
        good.send(b"ok2")
        assert good.recv(timeout=2) == b"ok2"
    assert "Handler for connection from bad failed" in caplog.text


def test_server_refuses_connections_when_not_running() -> None:
    server = InProcessServer(_echo)
    with pytest.raises(TransportError, match="not running"):
        server.connect()
    server.start()
    server.stop()
    with pytest.raises(TransportError, match="not running"):
        server.connect()
    with pytest.raises(TransportError, match="cannot be started again"):
        server.start()
