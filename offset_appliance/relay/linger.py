"""Closing without a reset. A socket closed while input waits unread in it (a connection the
relay had stopped reading: its tunnel's other end took no more) sends the peer a reset
instead of a FIN, and a reset throws away whatever of the relay's last bytes the kernel had
not sent yet: the messages relayed to a tunnel end just before its other end went, say.

So the relay closes its side with ``shutdown(SHUT_WR)`` (a FIN after everything it queued)
and keeps reading and dropping the peer's input until the peer closes too or
``LINGER_SECONDS`` pass; then the descriptor is closed. At most ``MAX_LINGERING`` sockets
linger at once; past that, and when the relay stops, a socket is closed at once (its unread
input read and dropped first, as far as it goes).
"""

from __future__ import annotations

import selectors
import socket
from collections import deque

LINGER_SECONDS = 5.0
MAX_LINGERING = 4096
# One look at a socket reads at most this much of its input (in reads of DISCARD_READ).
DISCARD_READS = 16
DISCARD_READ = 1 << 16


def discard_input(sock: socket.socket) -> bool:
    """Read and drop what the peer has sent; whether its side is still open."""
    for _ in range(DISCARD_READS):
        try:
            data = sock.recv(DISCARD_READ, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        if len(data) < DISCARD_READ:
            return True
    return True


class _Lingering:
    """One socket whose peer may still be sending; the loop calls ``handle`` when it is."""

    __slots__ = ("owner", "sock", "deadline")

    def __init__(self, owner: Linger, sock: socket.socket, deadline: float) -> None:
        self.owner = owner
        self.sock = sock
        self.deadline = deadline

    def handle(self, mask: int, now: float) -> None:
        if not discard_input(self.sock):
            self.owner.end(self)


class Linger:
    """The sockets the relay has closed its side of, until their peers close theirs."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.live: set[_Lingering] = set()
        self._order: deque[_Lingering] = deque()  # by deadline: all linger as long

    def __len__(self) -> int:
        return len(self.live)

    def close(self, sock: socket.socket, now: float) -> None:
        """Close ``sock`` (not registered with the selector) with a FIN, not a reset."""
        if not discard_input(sock) or len(self.live) >= MAX_LINGERING:
            sock.close()  # the peer closed too, or too many linger: now
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        entry = _Lingering(self, sock, now + LINGER_SECONDS)
        try:
            self.selector.register(sock, selectors.EVENT_READ, entry)
        except (OSError, ValueError):
            sock.close()
            return
        self.live.add(entry)
        self._order.append(entry)

    def end(self, entry: _Lingering) -> None:
        """The peer closed its side too (or its socket failed): let go of it."""
        if entry in self.live:
            self.live.discard(entry)
            self.selector.unregister(entry.sock)
            entry.sock.close()

    def expire(self, now: float) -> None:
        """Close the sockets that lingered their time."""
        order = self._order
        while order and (order[0].deadline <= now or order[0] not in self.live):
            self.end(order.popleft())

    def close_all(self) -> None:
        """The relay stops or hands over: every lingering socket is closed now."""
        for entry in list(self.live):
            self.end(entry)
        self._order.clear()
