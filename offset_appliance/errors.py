"""The project's exception hierarchy, and the typed reasons a connection ends for."""

import enum
import os


class CloseReason(enum.Enum):
    """Why a connection ended: one member per cause, never matched on English text.

    The value is the label ``/metrics`` counts it under (``connections_closed_total``, or
    ``handshakes_failed_total`` for a connection that never finished its handshake).
    """

    # The peer's side of the TCP connection.
    PEER_CLOSED = "peer_closed"
    RESET = "reset"
    # The wire protocol, as the peer broke it (carried by ``ProtocolError``).
    MALFORMED = "malformed"
    VERSION = "version"
    OVERSIZE_FRAME = "oversize_frame"
    BAD_DH_KEY = "bad_dh_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_NONCE = "wrong_nonce"
    WRONG_KEY = "wrong_key"
    DECRYPT_FAILED = "decrypt_failed"
    SETUP_TIMEOUT = "timeout"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    # The relay's rules (docs/protocol.md section 6).
    FIRST_MESSAGE_TIMEOUT = "first_message_timeout"
    HALF_TUNNEL_EXPIRED = "half_tunnel_expired"
    TUNNEL_PEER_CLOSED = "tunnel_peer_closed"
    LISTENER_CLOSED = "listener_closed"
    DUPLICATE_LISTEN = "duplicate_listen"
    RELAY_REFUSED = "relay_refused"
    HALF_TUNNEL_LIMIT = "half_tunnel_limit"
    LISTENER_FULL = "listener_full"
    REJECTED = "rejected"
    # The relay's access lists ([access]): the key may not listen (or accept) / connect.
    LISTEN_DENIED = "listen_denied"
    CONNECT_DENIED = "connect_denied"
    # A reload's access lists refuse what it is doing (its address, or its key for what it
    # asked): closed at that reload (relay/policy.py).
    DENIED = "denied"
    # The relay's own limits and life.
    EVICTED = "evicted"
    # Over the memory ceiling, its receiver took no byte of a large queue for a keepalive
    # timeout (relay/policy.py).
    STALLED = "stalled"
    FLUSH_TIMEOUT = "flush_timeout"
    BUDGET = "budget"  # over a transfer budget, with budgets.action = "refuse"
    SHUTDOWN = "shutdown"


class OffsetError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class ProtocolError(OffsetError):
    """The peer broke the wire protocol (docs/protocol.md); the connection must be closed.

    ``reason`` says how, for counting; the message says it in words, for the log.
    """

    def __init__(self, message: str, reason: CloseReason = CloseReason.MALFORMED) -> None:
        super().__init__(message)
        self.reason = reason


class LocalProtocolError(OffsetError):
    """Our own code used a connection in the wrong state (a bug here, not the peer's fault)."""


class ConfigError(OffsetError):
    """A configuration file or value is unusable."""

    exit_code = os.EX_CONFIG  # 78


class UsageError(OffsetError):
    """A command-line argument is unusable."""

    exit_code = os.EX_USAGE  # 64


class DataError(OffsetError):
    """An input file (identity, ticket) exists but its content is unusable."""

    exit_code = os.EX_DATAERR  # 65


class NoInputError(OffsetError):
    """An input file does not exist or cannot be opened."""

    exit_code = os.EX_NOINPUT  # 66


class CantCreateError(OffsetError):
    """An output file cannot be created (for example it exists already)."""

    exit_code = os.EX_CANTCREAT  # 73


class UnavailableError(OffsetError):
    """A service the program needs cannot be had (for example, its port is taken)."""

    exit_code = os.EX_UNAVAILABLE  # 69
