"""An honest tunnel that streams checked data through a swarm while a scenario attacks the
relay: it must never break, lose, alter or reorder a byte."""

from __future__ import annotations

from nacl.signing import SigningKey

from offset_appliance.wire.messages import Accept, Connect, Listen, encode_init_connection

from .relaylib import Stream, incoming_key
from .swarm import Session, Swarm

WINDOW = 64 * 1024


class HonestTunnel:
    """Listener, connector and acceptor in ``swarm``, streaming both ways without end."""

    def __init__(self, swarm: Swarm, number: int = 1_000_000, source: str | None = None):
        self.swarm = swarm
        self.identity = SigningKey.generate()
        unlimited = 1 << 62
        self.forward = Stream(number, 0, number, unlimited, 16 * 1024)
        self.backward = Stream(number, 1, number + 1, unlimited, 16 * 1024)
        self.listener = swarm.open(self.identity, source=source)
        self.listener.on_open = lambda s: swarm.send(s, encode_init_connection(Listen()))
        self.listener.on_message = self._on_incoming
        swarm.run_until(lambda: self.listener.is_open and not self.listener.pending, 30, "listen")
        # The relay reads the listen before the connect: the connect needs a full handshake.
        self.connector = swarm.open(source=source)
        self.connector.on_open = lambda s: swarm.send(
            s, encode_init_connection(Connect(self.listener.public_key))
        )
        self.connector.on_message = lambda s, m: self.backward.receive(m)
        self.acceptor: Session | None = None
        swarm.run_until(
            lambda: self.acceptor is not None and self.acceptor.is_open, 30, "honest tunnel"
        )

    def _on_incoming(self, listener: Session, message: bytes) -> None:
        key = incoming_key(message)
        if key != self.connector.public_key or self.acceptor is not None:
            raise AssertionError("the honest listener was told of a connect it never expected")
        acceptor = self.swarm.open(self.identity)
        acceptor.on_open = lambda s: self.swarm.send(s, encode_init_connection(Accept(key)))
        acceptor.on_message = lambda s, m: self.forward.receive(m)
        self.acceptor = acceptor

    @property
    def sessions(self) -> list[Session]:
        """The three connections of the honest node pair."""
        return [s for s in (self.listener, self.connector, self.acceptor) if s is not None]

    def pump(self) -> None:
        """Keep a window of data in flight both ways."""
        for session, stream in ((self.connector, self.forward), (self.acceptor, self.backward)):
            if session is not None and session.is_open:
                while session.pending < WINDOW:
                    self.swarm.send(session, stream.next_message())

    def check(self) -> int:
        """Assert it is intact and alive; returns the bytes it has delivered so far."""
        errors = self.forward.errors + self.backward.errors
        assert not errors, errors[:10]
        for session in self.sessions:
            assert not session.closed, f"the honest tunnel broke: {session.close_reason}"
            assert session.protocol_error is None, session.protocol_error
        return self.forward.received_bytes + self.backward.received_bytes
