"""What a connection is charged to while bandwidth limits or budgets are on: token buckets
and the per-connection meter that names them (relay/bandwidth.py decides with them)."""

from __future__ import annotations

from .usage import Entry

# A burst of 0 is one second's worth of the rate, and at least this.
MIN_AUTO_BURST = 64 * 1024
# A pause ends once every bucket is within this many bytes of paid off.
SLACK = 1.0


def auto_burst(rate: int, burst: int) -> float:
    return float(burst) if burst else float(max(rate, MIN_AUTO_BURST))


class Bucket:
    """A token bucket of ``rate`` bytes a second holding up to ``burst``; it may go into
    debt (the bytes were read already), and its users wait until the debt is paid."""

    __slots__ = ("kind", "rate", "burst", "tokens", "last", "users", "table", "name")

    def __init__(self, kind: str, rate: float, burst: float, now: float) -> None:
        self.kind = kind
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now
        self.users = 0
        self.table: dict[object, Bucket] | None = None  # the shared table it is kept in, if any
        self.name: object = None

    def set(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        if self.tokens > burst:
            self.tokens = burst

    def wait(self, now: float) -> float:
        """Seconds until its debt is paid (0 if there is none), without taking anything."""
        tokens = self.tokens + (now - self.last) * self.rate
        return -tokens / self.rate if tokens < -SLACK else 0.0


class Meter:
    """What one connection is charged to; rebuilt when the settings or the tables change."""

    __slots__ = (
        "generation",
        "buckets",
        "shared",
        "usage",
        "max_read",
        "paused_since",
        "kind",
        "resume_at",
        "pending",
        "batch",
    )

    def __init__(self) -> None:
        self.generation = -1
        self.pending = 0  # bytes read and not yet charged
        self.batch = 1  # charged once this many are pending
        self.buckets: tuple[Bucket, ...] = ()
        self.shared: list[Bucket] = []
        self.usage: tuple[Entry, ...] = ()
        self.max_read = 0
        self.paused_since: float | None = None
        self.kind = ""
        self.resume_at = 0.0
