"""The relay's hand-over state, typed: what one process gives the next on a restart.

``RelayState`` is what ``Relay.export_state`` makes and ``Relay.restore`` takes; the
container (relay/handover.py) carries it as a document of JSON types and bytes. Version 2 is
written; version 1 (relays before the Loop / Relay / Policy split) is still read: it lacks
each connection's source prefix, which is then worked out again from its address.

A version 2 state may also carry the configuration the relay ran with (``config``, made by
``config.carried_config``): a relay before it ignores the field, and a start whose files do
not load serves with it (README.md, "Restarts and upgrades").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The state's version, as the container carries it.
VERSION = 2
# Versions this code reads.
READABLE = (1, 2)


class StateError(ValueError):
    """A hand-over state this code cannot read."""


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """One connection: its socket's addresses (how the inherited socket is found), its
    protocol stack's state, what it had queued, and the relay's marks on it."""

    id: int
    local: tuple[str, int]
    remote: tuple[str, int]
    wire: Mapping[str, Any]  # ``wire.Connection.export_state``
    out: bytes
    paused: int
    closing: str | None  # the close reason's value while it flushes before closing
    close_in: float | None  # seconds left for that flush
    recv_size: int
    source: str | None  # the prefix it counts under; None from a version 1 state


@dataclass(frozen=True, slots=True)
class RelayState:
    """The whole relay (secret: it holds every channel's keys)."""

    relay: bytes  # the relay's public key: a state of another identity is refused
    boot_id: str  # the kernel's boot id: the monotonic clock is one clock until a reboot
    monotonic: float  # CLOCK_MONOTONIC when it was made
    core: dict[str, Any]  # ``RelayCore.export_state``
    connections: tuple[ConnectionState, ...]
    usage: dict[str, Any] | None  # transfer counts (budgets), newer than the state file
    # The running configuration (``config.carried_config``); None from a relay before it.
    config: dict[str, Any] | None = None

    def to_document(self) -> dict[str, object]:
        """As the container carries it (version ``VERSION``)."""
        document: dict[str, object] = {
            "relay": self.relay,
            "boot_id": self.boot_id,
            "monotonic": self.monotonic,
            "core": self.core,
            "clients": [
                {
                    "id": c.id,
                    "local": list(c.local),
                    "remote": list(c.remote),
                    "wire": c.wire,
                    "out": c.out,
                    "paused": c.paused,
                    "closing": c.closing,
                    "close_in": c.close_in,
                    "recv_size": c.recv_size,
                    "source": c.source,
                }
                for c in self.connections
            ],
            "usage": self.usage,
        }
        if self.config is not None:
            document["config"] = self.config
        return document

    @classmethod
    def from_document(cls, document: object, version: int) -> tuple[RelayState, list[str]]:
        """The state in a document of ``version``, and why each connection record that
        does not fit was left out. ``StateError`` if the whole does not hold together."""
        if version not in READABLE:
            raise StateError(f"hand-over state version {version}, this relay reads {READABLE}")
        if not isinstance(document, dict):
            raise StateError("hand-over state is not a record")
        try:
            relay = document["relay"]
            boot_id = document["boot_id"]
            monotonic = float(document["monotonic"])
            core = document["core"]
            records = list(document["clients"])
            usage = document.get("usage")
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"hand-over state incomplete: {exc!r}") from None
        if not isinstance(relay, bytes) or not isinstance(boot_id, str):
            raise StateError("hand-over state of the wrong type")
        if not isinstance(core, dict) or not (usage is None or isinstance(usage, dict)):
            raise StateError("hand-over state of the wrong type")
        connections = []
        failed = []
        for record in records:
            try:
                connections.append(_connection(record, version))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                failed.append(str(exc) or type(exc).__name__)
        # A configuration that is not a record is left out: the connections still come back.
        config = document.get("config") if version >= 2 else None
        if not isinstance(config, dict):
            config = None
        state = cls(relay, boot_id, monotonic, core, tuple(connections), usage, config)
        return state, failed


def _connection(record: object, version: int) -> ConnectionState:
    if not isinstance(record, dict):
        raise TypeError("connection record is not a record")
    local, remote = record["local"], record["remote"]
    cid, wire, out = record["id"], record["wire"], record["out"]
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise ValueError("connection id missing")
    if not isinstance(wire, dict):
        raise TypeError("connection state of the wrong type")
    if not isinstance(out, bytes):
        raise ValueError("output of the wrong type")
    closing = record["closing"]
    close_in = record["close_in"]
    source = record.get("source") if version >= 2 else None
    if closing is not None and not isinstance(closing, str):
        raise TypeError("close reason of the wrong type")
    if source is not None and not isinstance(source, str):
        raise TypeError("source of the wrong type")
    return ConnectionState(
        id=cid,
        local=(str(local[0]), int(local[1])),
        remote=(str(remote[0]), int(remote[1])),
        wire=wire,
        out=out,
        paused=int(record["paused"]),
        closing=closing,
        close_in=None if close_in is None else float(close_in),
        recv_size=int(record["recv_size"]),
        source=source,
    )
