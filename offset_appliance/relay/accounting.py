"""Close accounting: the one place where a connection's end is counted, by its typed reason.

Every close passes through ``CloseAccounting.closed`` exactly once, when the socket is
finally closed (a close that flushes first is counted when the flush ends, under the reason
it ends for), so each connection shows up in ``/metrics`` once and for one reason.
"""

from __future__ import annotations

import logging

from ..errors import CloseReason
from ..files import b64url_encode
from .clients import Client
from .metrics import Stats, close_label, handshake_label

log = logging.getLogger("strelay")

# Handshakes ended for these are counted as closes, not as failed handshakes.
NOT_FAILURES = frozenset({CloseReason.SHUTDOWN, CloseReason.DENIED})


class CloseAccounting:
    """Counts closes into ``Stats`` and logs each at debug level."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def closed(
        self,
        client: Client,
        reason: CloseReason,
        *,
        handshaking: bool,
        detail: str = "",
        now: float | None = None,
    ) -> None:
        """``client`` is gone for ``reason``; ``handshaking`` if its channel never opened."""
        stats = self.stats
        if handshaking:
            if reason in NOT_FAILURES:  # the relay's doing, not the handshake's failure
                stats.closed[reason.value] += 1
            else:
                stats.handshakes_failed[handshake_label(reason)] += 1
                stats.closed["handshake_failed"] += 1
        else:
            stats.closed[close_label(reason)] += 1
        stats.rekeys_closed += client.wire.rekeys
        if log.isEnabledFor(logging.DEBUG):
            # From these lines alone an operator finds the client that misbehaves: who (the
            # address and key prefix), as what, for how long, how much, and why it ended.
            key = client.wire.peer_public_key
            log.debug(
                "%s: close, key %s, %s, after %.1f s, %d B in, %d B out: %s%s",
                client.label,
                b64url_encode(key)[:8] if key else "-",
                client.role or ("handshake" if handshaking else "-"),
                (now - client.started) if now is not None else 0.0,
                client.bytes_in,
                client.bytes_out,
                reason.value,
                f" ({detail})" if detail else "",
            )
