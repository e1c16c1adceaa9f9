"""The listening sockets: opening them (or taking them from the service manager's store),
accepting in bounded batches, and shedding new connections cleanly when the process runs
out of file descriptors."""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
from collections.abc import Iterator, Sequence
from typing import Protocol

from ..config import format_address
from .metrics import Stats

log = logging.getLogger("strelay")

# Connections accepted from one listening socket per turn of the loop, so that a flood of
# connects cannot keep the loop from serving the connections it already has.
ACCEPT_BATCH = 64
# How long the listening sockets are left alone when no descriptor is left to accept with.
SHED_PAUSE = 0.1
FD_WARNING_INTERVAL = 60.0
BACKLOG = 1024
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Pausable(Protocol):
    """Another listening socket (the metrics endpoint) paused with the relay's own."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class ListenStore(Protocol):
    """Listening sockets kept from an earlier process (handover.Inherited)."""

    def take_listen(self, host: str, port: int) -> socket.socket | None: ...


class BindError(OSError):
    """A listening socket could not be opened; names the address."""

    def __init__(self, host: str, port: int, cause: OSError, *, kind: str = "relay") -> None:
        shown = format_address(host, port)
        super().__init__(cause.errno, f"cannot listen on {shown}: {cause.strerror or cause}")
        self.host, self.port, self.kind = host, port, kind

    def __str__(self) -> str:
        return self.strerror or ""


class Listeners:
    """The relay's listening sockets, watched by the loop's selector."""

    def __init__(self, selector: selectors.BaseSelector, stats: Stats) -> None:
        self.selector = selector
        self.stats = stats
        self.sockets: list[socket.socket] = []
        # Paused and resumed with the listening sockets when out of descriptors.
        self.also_paused: list[Pausable] = []
        self.paused_until = 0.0  # while shedding, the listening sockets are not watched
        self._reserve_fd: int | None = None
        self._fd_warning_at = 0.0

    def bind(
        self, addresses: Sequence[tuple[str, int]], inherited: ListenStore | None = None
    ) -> list[tuple[str, int]]:
        """Open a listening socket on each address, or take it from ``inherited``; returns
        the bound addresses (ports resolved). ``BindError`` names the one that failed."""
        bound = []
        for host, port in addresses:
            sock = inherited.take_listen(host, port) if inherited is not None else None
            if sock is None:
                sock = _listen(host, port)
            sock.setblocking(False)
            self.sockets.append(sock)
            self.selector.register(sock, selectors.EVENT_READ, sock)
            bound.append((sock.getsockname()[0], sock.getsockname()[1]))
        return bound

    def start(self) -> None:
        """Keep one descriptor in reserve, for refusing connections cleanly when out of them."""
        if self._reserve_fd is None:
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY)

    def stop(self) -> None:
        """Give back the reserve descriptor."""
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None

    def close(self) -> None:
        """Stop listening: close every listening socket (and give back the reserve)."""
        for sock in self.sockets:
            if not self.paused_until:  # while shedding they are not registered
                self.selector.unregister(sock)
            sock.close()
        self.sockets.clear()
        self.stop()

    def release(self) -> None:
        """Let go of the listening sockets without unregistering (the selector is done)."""
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        self.stop()

    def accept(self, lsock: socket.socket, now: float) -> Iterator[tuple[socket.socket, str, int]]:
        """The connections waiting on ``lsock`` (socket, address, port), at most
        ``ACCEPT_BATCH`` of them."""
        if now < self.paused_until:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self.shed(lsock, exc, now)
                # ECONNABORTED and the like concern one connection only.
                return
            yield sock, addr[0], addr[1]

    def shed(self, lsock: socket.socket, exc: OSError, now: float) -> None:
        """Out of descriptors (on ``lsock``, one of ours or the metrics endpoint's): refuse
        the waiting connections cleanly, keep serving others."""
        if now >= self._fd_warning_at:
            # One line per minute while it lasts, not one per shed.
            log.warning("out of file descriptors (%s): shedding new connections", exc.strerror)
            self._fd_warning_at = now + FD_WARNING_INTERVAL
        refused = self.stats.refused
        if self._reserve_fd is not None:
            # The reserve descriptor lets each waiting connection be accepted and closed at
            # once (a clean refusal) instead of waiting in the backlog until it times out.
            os.close(self._reserve_fd)
            self._reserve_fd = None
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, _ = lsock.accept()
                except OSError:
                    break
                sock.close()
                refused["file_descriptors"] += 1
            try:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass
        else:
            refused["file_descriptors"] += 1
        # A listening socket we cannot serve stays readable: stop watching the listening
        # sockets for a moment rather than spin on them, then look again.
        if not self.paused_until:
            for sock in self.sockets:
                self.selector.unregister(sock)
            for other in self.also_paused:
                other.pause()
        self.paused_until = now + SHED_PAUSE

    def next_deadline(self) -> float:
        """When the listening sockets are to be watched again (infinity if they are)."""
        return self.paused_until or float("inf")

    def handle_timer(self, now: float) -> None:
        """Watch the listening sockets again once the shedding pause is over."""
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            for sock in self.sockets:
                self.selector.register(sock, selectors.EVENT_READ, sock)
            for other in self.also_paused:
                other.resume()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Separate IPv4 and IPv6 sockets can then share one port.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(host, port, exc) from None
    return sock
