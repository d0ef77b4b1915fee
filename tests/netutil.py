"""Network helpers shared by the tests that start servers and process groups."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on loopback now (a later bind may still race another process for it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
