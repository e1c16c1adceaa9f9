"""Per-connection deadlines in one heap: each client has at most one live entry, the
earliest deadline it was given; stale entries are skipped when they come up."""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from .clients import Client


class Timers:
    """The deadlines of a relay's connections (keepalives, set-up, flush time-outs)."""

    __slots__ = ("_heap", "_clients")

    def __init__(self, clients: Mapping[int, Client]) -> None:
        # Ids, not clients: a closed connection is not kept alive by its last deadline.
        self._heap: list[tuple[float, int]] = []
        self._clients = clients

    def schedule(self, client: Client, when: float) -> None:
        """Make sure ``client`` is looked at by ``when``."""
        # Deadlines only ever move later except on state changes, so an entry is pushed
        # only when the new deadline is earlier than the live one.
        if when < client.timer_at:
            client.timer_at = when
            heapq.heappush(self._heap, (when, client.id))

    def next_deadline(self) -> float:
        """The earliest deadline (stale entries included: looking early costs one turn)."""
        heap = self._heap
        return heap[0][0] if heap else float("inf")

    def pop_due(self, now: float) -> Client | None:
        """A client whose live deadline is due at ``now`` (its entry spent), or None."""
        heap = self._heap
        clients = self._clients
        while heap and heap[0][0] <= now:
            when, cid = heapq.heappop(heap)
            client = clients.get(cid)
            if client is not None and client.timer_at == when:
                client.timer_at = float("inf")
                return client
        return None
