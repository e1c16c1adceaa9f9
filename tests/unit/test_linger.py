"""Closing without a reset (relay/linger.py): a FIN after what was queued, unread input
dropped until the peer closes too or the time runs out, at most MAX_LINGERING at once."""

from __future__ import annotations

import selectors
import socket

import pytest

from offset_appliance.relay import linger as lingering
from offset_appliance.relay.linger import LINGER_SECONDS, Linger


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (a reset is TCP's)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    ours.setblocking(False)
    return ours, peer


def serve(selector: selectors.BaseSelector, now: float) -> None:
    for key, mask in selector.select(0.2):
        key.data.handle(mask, now)


def test_unread_input_is_dropped_and_the_peer_gets_a_fin_after_the_last_bytes():
    selector = selectors.DefaultSelector()
    linger = Linger(selector)
    ours, peer = pair()
    peer.sendall(b"unread" * 10_000)  # never read by "the relay"
    ours.sendall(b"last words")
    linger.close(ours, now=0.0)
    assert len(linger) == 1
    peer.settimeout(5)
    received = b""
    while chunk := peer.recv(4096):  # a reset would raise here instead
        received += chunk
    assert received == b"last words"
    peer.sendall(b"more, after the FIN")  # still read and dropped: no reset
    serve(selector, 1.0)
    assert len(linger) == 1
    peer.close()  # the peer's FIN: let go at once
    serve(selector, 1.0)
    assert len(linger) == 0 and ours.fileno() == -1
    selector.close()


def test_a_peer_that_never_closes_is_let_go_after_its_time_and_all_go_at_a_stop():
    selector = selectors.DefaultSelector()
    linger = Linger(selector)
    (a, peer_a), (b, peer_b) = pair(), pair()
    linger.close(a, now=0.0)
    linger.close(b, now=1.0)
    linger.expire(LINGER_SECONDS - 0.1)
    assert len(linger) == 2
    linger.expire(LINGER_SECONDS)
    assert len(linger) == 1 and a.fileno() == -1 and b.fileno() != -1
    linger.close_all()
    assert len(linger) == 0 and b.fileno() == -1
    for sock in (peer_a, peer_b):
        sock.close()
    selector.close()


def test_past_the_cap_a_socket_is_closed_at_once(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(lingering, "MAX_LINGERING", 1)
    selector = selectors.DefaultSelector()
    linger = Linger(selector)
    (a, peer_a), (b, peer_b) = pair(), pair()
    linger.close(a, now=0.0)
    linger.close(b, now=0.0)
    assert len(linger) == 1 and b.fileno() == -1
    linger.close_all()
    for sock in (peer_a, peer_b):
        sock.close()
    selector.close()


def test_a_socket_whose_peer_already_closed_is_closed_at_once():
    linger = Linger(selectors.DefaultSelector())
    ours, peer = pair()
    peer.close()
    linger.close(ours, now=0.0)
    assert len(linger) == 0 and ours.fileno() == -1
