"""Sources and per-source rate limits.

A source is what every per-IP limit counts under: an address's prefix, by default the
IPv4 address itself (/32) and the IPv6 /64 (one IPv6 host commonly owns a whole /64), both
configurable (``limits.ipv4_prefix``, ``limits.ipv6_prefix``). IPv4-mapped IPv6 addresses
count as IPv4.

Each new connection costs the relay a signature, a verification and two X25519 operations
before it knows anything of the peer, far more than it costs the peer; the bucket bounds
that cost per source. The table of buckets stays small: a bucket that has refilled holds
no information and is dropped.
"""

from __future__ import annotations

import ipaddress

IPV4_PREFIX = 32
# An IPv6 host commonly owns a whole /64: count it as one source.
IPV6_PREFIX = 64


class Prefixes:
    """Maps an address to its source: ``198.18.0.7`` (a /32 is the address itself),
    ``198.18.0.0/24``, ``2001:db8:1:2::/64``."""

    __slots__ = ("ipv4", "ipv6")

    def __init__(self, ipv4: int = IPV4_PREFIX, ipv6: int = IPV6_PREFIX) -> None:
        self.ipv4 = ipv4
        self.ipv6 = ipv6

    def __call__(self, ip: str) -> str:
        if ":" not in ip:
            if self.ipv4 == 32:
                return ip
            try:
                v4 = ipaddress.IPv4Address(ip)
            except ValueError:
                return ip
            return self._v4(int(v4))
        try:
            address = ipaddress.IPv6Address(ip.split("%", 1)[0])
        except ValueError:
            return ip
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped) if self.ipv4 == 32 else self._v4(int(mapped))
        bits = self.ipv6
        if bits == 128:
            return str(address)
        return str(ipaddress.IPv6Network((int(address) >> (128 - bits) << (128 - bits), bits)))

    def _v4(self, value: int) -> str:
        bits = self.ipv4
        return str(ipaddress.IPv4Network((value >> (32 - bits) << (32 - bits), bits)))


source_of = Prefixes()


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
