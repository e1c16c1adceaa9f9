"""What the relay's rooms ask the IO shell to do: small typed actions, applied in one place
(``Relay``), whoever emits them (the core for the protocol, the policy for the operator's
controls).

- ``Send(conn_id, payload)``: send one relay message on that connection;
- ``Close(conn_id, reason, flush)``: close it, after flushing its output if ``flush``;
- ``Pause(conn_id, why)`` / ``Resume(conn_id, why)``: stop / resume reading it for ``why``,
  one of the ``PAUSED_BY_*`` flags; reading resumes when no reason is left.
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import CloseReason

# Reasons a connection's reading is paused; reading resumes when none is left.
PAUSED_BY_PEER = 1  # the connection it feeds has too much queued output
PAUSED_BY_CORE = 2  # its half-tunnel buffer is full
PAUSED_BY_CLOSE = 4  # it is closing after a flush
PAUSED_BY_MEMORY = 8  # the relay is over its memory ceiling and it feeds a large queue
PAUSED_BY_RATE = 16  # a bandwidth bucket it is charged to is in debt (relay/bandwidth.py)


class Send(NamedTuple):
    """Send one relay message on a connection."""

    conn_id: int
    payload: bytes


class Close(NamedTuple):
    """Close a connection (the core has forgotten it already), flushing its output first."""

    conn_id: int
    reason: CloseReason
    flush: bool = False


class Pause(NamedTuple):
    """Stop reading a connection for ``why`` (the core's: its half-tunnel buffer is full)."""

    conn_id: int
    why: int = PAUSED_BY_CORE


class Resume(NamedTuple):
    """Drop ``why`` for not reading a connection (the core's: its half-tunnel was accepted)."""

    conn_id: int
    why: int = PAUSED_BY_CORE


Action = Send | Close | Pause | Resume
