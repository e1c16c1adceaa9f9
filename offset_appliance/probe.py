"""``stmgr probe``: prove a relay's identity and carry a message through a real tunnel.

Exit codes: 0 healthy, 1 the relay misbehaved or proved the wrong key, 2 unreachable.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from .client import ClientError, ConnectionClosed, RelayClient, Unreachable
from .files import b64url_encode, load_ticket, split_host_port

HEALTHY = 0
MISBEHAVED = 1
UNREACHABLE = 2


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found."""

    code: int
    address: str
    message: str
    handshake_seconds: float | None = None
    round_trip_seconds: float | None = None


# The [access] lists that refuse each request, and the probe's option for an identity they
# admit (relay/access.py: a refused listen or connect is closed right after the request).
_ACCESS_LISTS = {
    "listen": ("listen_allow", "listen_deny", "--listener-idfile"),
    "connect": ("connect_allow", "connect_deny", "--connector-idfile"),
}


def refused_message(kind: str, identity: SigningKey | None) -> str:
    """Why a ``kind`` ("listen" or "connect") the relay closed right after the request most
    likely failed, and what to do about it."""
    allow, deny, option = _ACCESS_LISTS[kind]
    closed = "(it closed the connection right after the request)"
    cause = f"[access] {allow} or {deny} is the likely cause"
    if identity is None:
        return (
            f"the relay refused the {kind} {closed}; {cause}: "
            f"probe with {option} IDENTITY, one the list admits"
        )
    key = b64url_encode(bytes(identity.verify_key))
    also = ", or another client listening with this key" if kind == "listen" else ""
    return f"the relay refused the {kind} of the {option} key {key} {closed}; {cause}{also}"


def probe(
    address: str,
    public_key: bytes,
    timeout: float,
    *,
    listener_id: SigningKey | None = None,
    connector_id: SigningKey | None = None,
) -> ProbeResult:
    """Listen, connect, accept and echo a message both ways through the relay at ``address``:
    as ``listener_id`` (listen and accept) and ``connector_id``, or throwaway identities."""
    host, port = split_host_port(address)
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClientError("probe timed out")
        return left

    given_listener, given_connector = listener_id, connector_id
    listener_id = listener_id or SigningKey.generate()
    connector_id = connector_id or SigningKey.generate()
    clients: list[RelayClient] = []
    try:
        listener = RelayClient.open(
            (host, port), listener_id, expected_key=public_key, timeout=remaining()
        )
        clients.append(listener)
        handshake = listener.handshake_seconds
        listener.listen()
        connector = RelayClient.open(
            (host, port), connector_id, expected_key=public_key, timeout=remaining()
        )
        clients.append(connector)
        connector.connect(listener.public_key)
        try:
            # The listen has no answer: a refused one shows as its connection closed, which
            # comes before the connect's (then refused for want of a listener).
            first = RelayClient.wait_any([listener, connector], remaining())
        except ConnectionClosed:
            if listener.closed:
                return ProbeResult(MISBEHAVED, address, refused_message("listen", given_listener))
            return ProbeResult(MISBEHAVED, address, refused_message("connect", given_connector))
        if first is not listener:
            return ProbeResult(MISBEHAVED, address, "relay sent tunnel data before the accept")
        incoming = listener.next_incoming(remaining())
        if incoming != connector.public_key:
            return ProbeResult(MISBEHAVED, address, "relay announced the wrong connecting key")
        acceptor = RelayClient.open(
            (host, port), listener_id, expected_key=public_key, timeout=remaining()
        )
        clients.append(acceptor)
        acceptor.accept(connector.public_key)
        ping = os.urandom(32)
        started = time.monotonic()
        connector.send(ping)
        if acceptor.receive(remaining()) != ping:
            return ProbeResult(MISBEHAVED, address, "tunnel delivered different bytes")
        acceptor.send(ping[::-1])
        if connector.receive(remaining()) != ping[::-1]:
            return ProbeResult(MISBEHAVED, address, "tunnel delivered different bytes")
        round_trip = time.monotonic() - started
    except Unreachable as exc:
        return ProbeResult(UNREACHABLE, address, str(exc))
    except (ClientError, socket.gaierror) as exc:
        return ProbeResult(MISBEHAVED, address, str(exc))
    finally:
        for client in clients:
            client.close()
    return ProbeResult(HEALTHY, address, "ok", handshake, round_trip)


def format_text(result: ProbeResult) -> str:
    """One line for a person or a log."""
    if result.code != HEALTHY:
        state = "UNREACHABLE" if result.code == UNREACHABLE else "FAILED"
        return f"{state} relay {result.address}: {result.message}"
    assert result.handshake_seconds is not None and result.round_trip_seconds is not None
    return (
        f"OK relay {result.address}: handshake {result.handshake_seconds * 1000:.1f} ms, "
        f"tunnel round trip {result.round_trip_seconds * 1000:.1f} ms"
    )


def format_prometheus(result: ProbeResult) -> str:
    """The Prometheus text format, for node_exporter's textfile collector."""
    label = '{address="' + result.address.replace("\\", "\\\\").replace('"', '\\"') + '"}'
    lines = [
        "# HELP offset_relay_probe_success Whether the relay proved its key and relayed a message.",
        "# TYPE offset_relay_probe_success gauge",
        f"offset_relay_probe_success{label} {1 if result.code == HEALTHY else 0}",
        "# HELP offset_relay_probe_exit_code Probe exit code (0 ok, 1 failed, 2 unreachable).",
        "# TYPE offset_relay_probe_exit_code gauge",
        f"offset_relay_probe_exit_code{label} {result.code}",
    ]
    if result.code == HEALTHY:
        lines += [
            "# HELP offset_relay_probe_handshake_seconds Time to connect and finish the handshake.",
            "# TYPE offset_relay_probe_handshake_seconds gauge",
            f"offset_relay_probe_handshake_seconds{label} {result.handshake_seconds:.6f}",
            "# HELP offset_relay_probe_round_trip_seconds Round trip of a message via a tunnel.",
            "# TYPE offset_relay_probe_round_trip_seconds gauge",
            f"offset_relay_probe_round_trip_seconds{label} {result.round_trip_seconds:.6f}",
        ]
    return "\n".join(lines)


def run_probe(
    ticket_path: Path | None,
    timeout: float,
    fmt: str,
    *,
    address: str | None = None,
    public_key: bytes | None = None,
    listener_id: SigningKey | None = None,
    connector_id: SigningKey | None = None,
) -> int:
    """Probe the relay a ticket names (or ``address`` and ``public_key``, which override
    the ticket's), as ``listener_id`` and ``connector_id`` if given; prints the result;
    returns the exit code."""
    if ticket_path is not None:
        ticket = load_ticket(ticket_path)
        address = address or ticket.address
        public_key = public_key or ticket.public_key
    assert address is not None and public_key is not None
    result = probe(address, public_key, timeout, listener_id=listener_id, connector_id=connector_id)
    if fmt == "prometheus":
        print(format_prometheus(result))
    else:
        stream = sys.stdout if result.code == HEALTHY else sys.stderr
        print(format_text(result), file=stream)
    return result.code
