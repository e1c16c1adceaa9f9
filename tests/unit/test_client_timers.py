"""RelayClient runs its timers while data keeps arriving, not only when the socket is quiet."""

from __future__ import annotations

import time

from nacl.signing import SigningKey

from offset_appliance.client import RelayClient
from offset_appliance.wire.connection import Connection


class _Flood:
    """A socket whose far end is an in-memory relay-side Connection that never stops sending:
    every ``recv`` returns data at once, so the client never sees a receive timeout."""

    def __init__(self, relay: Connection) -> None:
        self.relay = relay
        self.flooding = False

    def settimeout(self, value: float) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.relay.receive_data(data, time.monotonic())

    def recv(self, size: int) -> bytes:
        if self.flooding:
            self.relay.send_message(b"flood", time.monotonic())
        return b"".join(self.relay.data_to_send())

    def close(self) -> None:
        pass


def test_a_client_that_only_receives_still_sends_keepalives():
    relay = Connection(SigningKey.generate(), time.monotonic(), keepalive=0.4)
    sock = _Flood(relay)
    client = RelayClient(sock, SigningKey.generate(), keepalive=0.4)
    client._handshake(time.monotonic() + 5)
    sock.flooding = True
    opened = time.monotonic()
    heard = relay._keepalive.last_recv
    while time.monotonic() - opened < 1.0:
        assert client.receive(1.0) == b"flood"
    # The client sent KaMessages (keepalives) while the flood went on: the relay heard it
    # within the last half interval and would not drop it.
    assert relay._keepalive.last_recv > heard
    assert time.monotonic() - relay._keepalive.last_recv < 0.4
