"""Errors carry a typed reason: the peer's faults are ProtocolErrors with a CloseReason, our
own misuse of an API is a LocalProtocolError, and /metrics labels come from the reason."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from offset_appliance.errors import CloseReason, LocalProtocolError, ProtocolError
from offset_appliance.relay.metrics import (
    CLOSE_REASONS,
    HANDSHAKE_FAILURES,
    close_label,
    handshake_label,
)
from offset_appliance.wire.connection import Connection
from offset_appliance.wire.frames import FrameDecoder, frame_header
from offset_appliance.wire.messages import ExchangeDh

from ..helpers import pair


def reason_of(call) -> CloseReason:
    with pytest.raises(ProtocolError) as caught:
        call()
    return caught.value.reason


def test_the_wire_says_why_with_a_reason():
    assert reason_of(lambda: FrameDecoder(16).feed(frame_header(17))) is CloseReason.OVERSIZE_FRAME
    version = frame_header(4) + (7).to_bytes(4, "big")
    conn = Connection(SigningKey.generate(), 0.0)
    assert reason_of(lambda: conn.receive_data(version, 0.0)) is CloseReason.VERSION
    waiting = Connection(SigningKey.generate(), 0.0, conn_timeout=8.0)
    assert reason_of(lambda: waiting.handle_timer(8.0)) is CloseReason.SETUP_TIMEOUT
    a, _b = pair(keepalive=10.0)
    assert reason_of(lambda: a.handle_timer(10.0)) is CloseReason.KEEPALIVE_TIMEOUT
    # A message with a field missing is malformed, whatever the field is called.
    assert reason_of(lambda: ExchangeDh.decode(b"\x00\x00")) is CloseReason.MALFORMED


def test_using_a_connection_in_the_wrong_state_is_our_error_not_the_peers():
    conn = Connection(SigningKey.generate(), 0.0)
    with pytest.raises(LocalProtocolError):
        conn.send_message(b"too early", 0.0)
    with pytest.raises(LocalProtocolError):
        conn.start_rekey(0.0)
    assert not issubclass(LocalProtocolError, ProtocolError)


def test_every_reason_has_a_label_that_metrics_export():
    for reason in CloseReason:
        assert close_label(reason) in CLOSE_REASONS
        assert handshake_label(reason) in HANDSHAKE_FAILURES or reason is CloseReason.SHUTDOWN
    assert handshake_label(CloseReason.BAD_SIGNATURE) == "bad_signature"
    assert close_label(CloseReason.BAD_SIGNATURE) == "protocol_error"
    assert handshake_label(CloseReason.RESET) == "peer_closed"
