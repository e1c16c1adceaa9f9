"""Close accounting: the one place where a connection's end is counted, by its typed reason.

Every close passes through ``CloseAccounting.closed`` exactly once, when the socket is
finally closed (a close that flushes first is counted when the flush ends, under the reason
it ends for), so each connection shows up in ``/metrics`` once and for one reason.
"""

from __future__ import annotations

import logging

from ..errors import CloseReason
from .clients import Client
from .metrics import Stats, close_label, handshake_label

log = logging.getLogger("strelay")


class CloseAccounting:
    """Counts closes into ``Stats`` and logs each at debug level."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def closed(
        self, client: Client, reason: CloseReason, *, handshaking: bool, detail: str = ""
    ) -> None:
        """``client`` is gone for ``reason``; ``handshaking`` if its channel never opened."""
        stats = self.stats
        if handshaking:
            if reason is CloseReason.SHUTDOWN:
                stats.closed["shutdown"] += 1
            else:
                stats.handshakes_failed[handshake_label(reason)] += 1
                stats.closed["handshake_failed"] += 1
        else:
            stats.closed[close_label(reason)] += 1
        stats.rekeys_closed += client.wire.rekeys
        if detail:
            log.debug("%s: closed: %s (%s)", client.label, reason.value, detail)
        else:
            log.debug("%s: closed: %s", client.label, reason.value)
