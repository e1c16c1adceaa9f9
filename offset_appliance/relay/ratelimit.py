"""Per-source rate limits: a token bucket per source address (IPv6 per /64).

Each new connection costs the relay a signature, a verification and two X25519 operations
before it knows anything of the peer, far more than it costs the peer; the bucket bounds
that cost per source. The table of buckets stays small: a bucket that has refilled holds
no information and is dropped.
"""

from __future__ import annotations

import ipaddress

# An IPv6 host commonly owns a whole /64: count it as one source.
IPV6_PREFIX = 64


def source_of(ip: str) -> str:
    """The key a source address is counted under: itself (IPv4) or its /64 (IPv6)."""
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    network = ipaddress.IPv6Network(
        (int(address) >> (128 - IPV6_PREFIX) << (128 - IPV6_PREFIX), IPV6_PREFIX)
    )
    return str(network)


class RateLimiter:
    """``rate`` events a second per key on average, ``burst`` at once."""

    __slots__ = ("rate", "burst", "_buckets", "_next_prune")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        # key -> (tokens, time of the last update)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._next_prune = 0.0

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key``; False (nothing taken) when its bucket is empty."""
        if now >= self._next_prune:
            self._prune(now)
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        # A bucket full again is the same as no bucket: drop it. Runs about once a second,
        # so the table holds at most the sources seen within the time a bucket takes to refill.
        refill = self.burst / self.rate if self.rate > 0 else float("inf")
        stale = [key for key, (_, last) in self._buckets.items() if now - last >= refill]
        for key in stale:
            del self._buckets[key]
        self._next_prune = now + 1.0

    def __len__(self) -> int:
        return len(self._buckets)
