"""Byte-message transports (in-process and gRPC streams) behind one Connection Protocol."""
