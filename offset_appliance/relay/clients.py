"""What the IO shell keeps for each accepted TCP connection."""

from __future__ import annotations

import socket

from ..config import format_address
from ..errors import CloseReason
from ..wire.connection import Connection
from .actions import (
    PAUSED_BY_CLOSE,
    PAUSED_BY_CORE,
    PAUSED_BY_MEMORY,
    PAUSED_BY_PEER,
    PAUSED_BY_RATE,
)
from .meters import Meter

__all__ = [
    "PAUSED_BY_CLOSE",
    "PAUSED_BY_CORE",
    "PAUSED_BY_MEMORY",
    "PAUSED_BY_PEER",
    "PAUSED_BY_RATE",
    "RECV_MAX",
    "RECV_MIN",
    "Client",
]

# Read sizes adapt per connection, as event loops do: a read that fills the request doubles
# the next one (bulk streams), a short one halves it. Small reads keep CPython's bytes
# objects below glibc's mmap threshold, which otherwise costs an mmap, mremap and munmap
# per read (bench/PROFILE.md); large ones keep a bulk stream to few system calls.
RECV_MIN = 64 * 1024
RECV_MAX = 1024 * 1024


class Client:
    """One accepted TCP connection: its socket, its protocol stack and its output queue."""

    __slots__ = (
        "id",
        "sock",
        "ip",
        "source",
        "label",
        "wire",
        "out",
        "out_size",
        "paused",
        "closing",
        "close_reason",
        "events",
        "timer_at",
        "close_by",
        "recv_size",
        "started",
        "bytes_in",
        "bytes_out",
        "role",
        "served_in",
        "ready",
        "meter",
        "congested",
    )

    def __init__(self, conn_id: int, sock: socket.socket, ip: str, port: int, wire: Connection):
        self.id = conn_id
        self.sock = sock
        self.ip = ip
        # The source it counts under for every per-IP limit: its address's prefix
        # (``limits.ipv4_prefix`` / ``ipv6_prefix``), e.g. "198.18.0.7", "2001:db8::/64".
        self.source = ip
        self.label = format_address(ip, port)
        self.wire = wire
        self.out: list[bytes | memoryview] = []
        self.out_size = 0
        self.paused = 0
        self.closing = False  # flushing its output before it closes
        self.close_reason: CloseReason | None = None  # why, while closing
        self.events = 0
        self.timer_at = float("inf")
        self.close_by = float("inf")  # a closing connection's flush must end by then
        self.recv_size = RECV_MIN
        # For the debug line when it closes: since when, relayed payload bytes each way, and
        # its role (kept here once the core has forgotten the connection).
        self.started = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.role = ""
        self.served_in = 0  # the turn of the loop it was last served in
        self.ready = 0  # its selector events while it waits in the loop's queue (0: not queued)
        # What it is charged to, while bandwidth limits or budgets are on.
        self.meter: Meter | None = None
        # Its queue is above the high water mark (the core has been told: set_congested).
        self.congested = False
