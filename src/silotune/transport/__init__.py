"""Byte-message transports (in-process and gRPC streams) behind one Connection Protocol.

The gRPC transport lives in :mod:`silotune.transport.grpc_stream` and its certificates in
:mod:`silotune.transport.tls`; they are not imported here so in-process users skip gRPC.
"""

from silotune.transport.base import (
    Connection,
    ConnectionClosed,
    ConnectionHandler,
    ConnectionServer,
    MessageTooLarge,
    TransportError,
    TransportTimeout,
)
from silotune.transport.inprocess import InProcessConnection, InProcessServer, inprocess_pair

__all__ = [
    "Connection",
    "ConnectionClosed",
    "ConnectionHandler",
    "ConnectionServer",
    "InProcessConnection",
    "InProcessServer",
    "MessageTooLarge",
    "TransportError",
    "TransportTimeout",
    "inprocess_pair",
]
