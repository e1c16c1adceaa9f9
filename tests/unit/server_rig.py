"""An in-process relay on loopback, driven turn by turn under a clock the test moves.

``Rig`` runs a ``RelayServer`` with a fake clock, and ``Node`` is a client end made of a real
socket and the sans-IO ``wire.Connection``, pumped from the same thread: keepalives, flush
timeouts and expiries happen when the test moves the clock, in milliseconds of real time.
"""

from __future__ import annotations

import socket
from pathlib import Path

from nacl.signing import SigningKey

from offset_appliance.config import Bandwidth, Budgets, Config, Limits, Timeouts
from offset_appliance.relay.clients import Client
from offset_appliance.relay.server import RelayServer
from offset_appliance.wire.connection import Connection, State
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    Listen,
    encode_init_connection,
)

QUIET_WAIT = 0.005


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# Sections that may be given as a dict of their keys.
DATACLASSES = {"bandwidth": Bandwidth, "budgets": Budgets}


def config(limits: dict | None = None, timeouts: dict | None = None, **sections) -> Config:
    """A loopback config with the given limits and timeouts (and other sections, such as
    ``access=Access(...)``, or ``bandwidth={...}`` for a table given as a dict)."""
    sections = {
        name: DATACLASSES[name](**value) if isinstance(value, dict) else value
        for name, value in sections.items()
    }
    return Config(
        identity_file=Path("/nonexistent"),
        listen=(("127.0.0.1", 0),),
        limits=Limits(**(limits or {})),
        timeouts=Timeouts(**(timeouts or {})),
        **sections,
    )


class Node:
    """One client connection to the rig's relay."""

    def __init__(
        self,
        rig: Rig,
        identity: SigningKey | None = None,
        rcvbuf: int | None = None,
        source: str | None = None,
    ):
        self.rig = rig
        self.identity = identity or SigningKey.generate()
        self.public_key = bytes(self.identity.verify_key)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # As the relay's own sockets: a small write goes out at once, not held back (Nagle)
        # until the relay acknowledges the one before, which loopback delays by tens of ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:  # another loopback address (127.0.0.2): another source
            sock.bind((source, 0))
        sock.connect(rig.address)
        sock.setblocking(False)
        self.sock = sock
        self.wire = Connection(
            self.identity, rig.clock(), expected_peer=rig.server.public_key, conn_timeout=1e9
        )
        self.pending = b""
        self.inbox: list[bytes] = []
        self.received = 0
        self.reading = True
        self.eof = False
        rig.nodes.append(self)

    @property
    def is_open(self) -> bool:
        return self.wire.state is State.OPEN and not self.eof

    def send(self, message: bytes) -> None:
        self.wire.send_message(message, self.rig.clock())

    def close(self) -> None:
        self.sock.close()
        self.rig.nodes.remove(self)

    def pump(self) -> bool:
        """Write what is queued, read what arrived; whether anything moved."""
        moved = False
        self.pending += b"".join(self.wire.data_to_send())
        if self.pending:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                sent = 0
            except (ConnectionResetError, BrokenPipeError):  # the relay closed it
                self.pending, sent = b"", 0
                self.eof = True
            self.pending = self.pending[sent:]
            moved = sent > 0
        while self.reading and not self.eof:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data = b""
            moved = True
            if not data:
                self.eof = True
                break
            self.received += len(data)
            if self.wire.state is not State.CLOSED:
                self.inbox.extend(self.wire.receive_data(data, self.rig.clock()))
        return moved


class Rig:
    """A relay server in this process, and the nodes that talk to it."""

    def __init__(self, limits=None, timeouts=None, reload_config=None, **sections) -> None:
        self.clock = FakeClock()
        self.config = config(limits, timeouts, **sections)
        self.server = RelayServer(
            self.config, SigningKey.generate(), clock=self.clock, reload_config=reload_config
        )
        ((host, port),) = self.server.bind()
        self.address = (host, port)
        self.nodes: list[Node] = []

    def settle(self, rounds: int = 2000) -> None:
        """Turn the loop and pump the nodes until nothing moves for a few rounds.

        Loopback delivers a moment after ``send`` returns, so a quiet round waits a little
        (real time) for the server's sockets; the clock the relay sees does not move.
        """
        quiet = 0
        for _ in range(rounds):
            moved = self.server.step(QUIET_WAIT) > 0
            for node in list(self.nodes):
                moved |= node.pump()
            if moved or self.server.relay.has_work():
                quiet = 0
            else:
                quiet += 1
                if quiet >= 3:
                    return
        raise AssertionError("the rig never settled")

    def node(self, identity=None, rcvbuf=None, source=None) -> Node:
        node = Node(self, identity, rcvbuf, source)
        self.settle()
        assert node.is_open, "handshake did not finish"
        return node

    def client_of(self, node: Node) -> Client:
        """The server's side of a node's connection."""
        host, port = node.sock.getsockname()
        label = f"{host}:{port}"
        (client,) = [c for c in self.server.clients.values() if c.label == label]
        return client

    def listener(self, identity=None, source=None) -> Node:
        node = self.node(identity, source=source)
        node.send(encode_init_connection(Listen()))
        self.settle()
        return node

    def tunnel(self, connect_from: str | None = None) -> tuple[Node, Node, Node]:
        """Listen, connect (from ``connect_from``, if given), accept: (listener, connector,
        acceptor)."""
        listener = self.listener()
        connector = self.node(source=connect_from)
        connector.send(encode_init_connection(Connect(listener.public_key)))
        self.settle()
        assert listener.inbox.pop() == IncomingConnection(connector.public_key).encode()
        acceptor = self.node(listener.identity)
        acceptor.send(encode_init_connection(Accept(connector.public_key)))
        self.settle()
        return listener, connector, acceptor

    def close(self) -> None:
        self.server.shutdown()
        self.server.selector.close()
        for node in list(self.nodes):
            node.close()
