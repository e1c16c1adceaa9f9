"""Automatic bans (``[bans]``): a source (IP prefix) refused more than ``threshold`` times
within ``window`` seconds is refused at accept for ``ban_time``, a time that is multiplied
by ``multiplier`` on each repeat within ``forget_after`` of the last ban's end, up to
``max_ban_time``.

What counts as a refusal (a strike) is decided by the server: failed handshakes, the
per-source limits, denied addresses and keys, budget refusals. A banned source's
connections are closed at accept and are not strikes. Strikes are counted per fixed window
(the count restarts when a window ends), which needs two numbers per source.

The table is bounded: at most ``table_size`` sources, least recently used out (an evicted
source that was banned is free again). Each ban is one log line, each lift at most one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from ..config import Bans

log = logging.getLogger("strelay")


class _Source:
    __slots__ = ("window_start", "strikes", "banned_until", "bans", "last_ban_end")

    def __init__(self, now: float) -> None:
        self.window_start = now
        self.strikes = 0
        self.banned_until = 0.0
        self.bans = 0  # bans in a row (each within forget_after of the previous one's end)
        self.last_ban_end = 0.0


class BanTable:
    """Strikes and bans of sources, bounded in size."""

    def __init__(self, bans: Bans | None = None) -> None:
        self.settings = bans if bans is not None else Bans()
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self.total = 0  # bans so far
        self._banned = 0  # entries with a ban that may still run (lifted lazily)

    def apply_config(self, bans: Bans) -> None:
        """New settings: bans running keep their end; a smaller table drops the least
        recently used sources; disabled, every ban is lifted and nothing is tracked."""
        self.settings = bans
        if not bans.enabled:
            if self._banned:
                log.info("bans disabled: lifting %d bans", self.active(None))
            self._sources.clear()
            self._banned = 0
            return
        self._trim()

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def is_banned(self, source: str, now: float) -> bool:
        """Whether ``source`` is banned now (a ban that has run out is lifted here)."""
        if not self._banned:
            return False
        entry = self._sources.get(source)
        if entry is None or not entry.banned_until:
            return False
        if now < entry.banned_until:
            self._sources.move_to_end(source)
            return True
        self._lift(source, entry)
        return False

    def strike(self, source: str, now: float) -> bool:
        """``source`` was refused once; returns whether this ban it (it is banned now)."""
        settings = self.settings
        if not settings.enabled or not source:
            return False
        sources = self._sources
        entry = sources.get(source)
        if entry is None:
            entry = sources[source] = _Source(now)
            self._trim()
        else:
            sources.move_to_end(source)
            if entry.banned_until:
                if now < entry.banned_until:
                    return False  # already banned: its refusals are not strikes
                self._lift(source, entry)
        if now - entry.window_start >= settings.window:
            entry.window_start = now
            entry.strikes = 0
        entry.strikes += 1
        if entry.strikes <= settings.threshold:
            return False
        if entry.bans and now - entry.last_ban_end > settings.forget_after:
            entry.bans = 0
        entry.bans += 1
        length = min(
            settings.ban_time * settings.multiplier ** (entry.bans - 1), settings.max_ban_time
        )
        entry.banned_until = now + length
        entry.last_ban_end = entry.banned_until
        self._banned += 1
        self.total += 1
        log.warning(
            "banning %s for %g s: %d refusals in %g s (ban %d)",
            source,
            round(length, 1),
            entry.strikes,
            settings.window,
            entry.bans,
        )
        entry.strikes = 0
        entry.window_start = now
        return True

    def expire(self, now: float) -> None:
        """Lift the bans that have run out (for the gauge and the log; about once a second)."""
        if not self._banned:
            return
        for source, entry in list(self._sources.items()):
            if entry.banned_until and now >= entry.banned_until:
                self._lift(source, entry)

    def active(self, now: float | None) -> int:
        """Bans running at ``now`` (all not yet lifted, if None)."""
        if not self._banned:
            return 0
        return sum(
            1
            for entry in self._sources.values()
            if entry.banned_until and (now is None or now < entry.banned_until)
        )

    def __len__(self) -> int:
        return len(self._sources)

    def _lift(self, source: str, entry: _Source) -> None:
        entry.banned_until = 0.0
        self._banned -= 1
        log.info("ban of %s lifted", source)

    def _trim(self) -> None:
        sources = self._sources
        while len(sources) > self.settings.table_size:
            _, entry = sources.popitem(last=False)
            if entry.banned_until:
                self._banned -= 1
