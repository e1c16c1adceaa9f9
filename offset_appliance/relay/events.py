"""What the operator reads in the log about strangers: refusals by the relay's limits and
lists, and handshakes that failed, one warning line per kind and source at most once a
minute, with how many there were.

The first line of a source's spell comes one second after its first refusal (at the end of
the loop's turn then), so a burst is counted in it; the rest of the minute is summed in one
line at its end. Each line's count is the number in the time it names, true when printed:
``refusing 100.64.0.7: max_connections_per_ip (256); 412 refused in the last 1 s``.

A flood from one address costs two lines a minute, not one per connection; the number of
sources remembered is bounded, so a flood from many addresses cannot grow it either (the
excess is counted under ``other sources``).
"""

from __future__ import annotations

import logging

log = logging.getLogger("strelay")

WINDOW = 60.0
FIRST_DELAY = 1.0
MAX_SOURCES = 1024
OTHERS = "other sources"
PAST = {"refusing": "refused", "evicting": "evicted", "dropping": "dropped"}


class _Window:
    """One kind's refusals of one source: since when, how many since the last line, the
    limit's last value, and when the last line was said (None: not yet)."""

    __slots__ = ("start", "count", "value", "said_at")

    def __init__(self, start: float, value: int | None) -> None:
        self.start = start
        self.count = 0
        self.value = value
        self.said_at: float | None = None


class RefusalLog:
    """Rate-limited warnings: ``refusing 100.64.0.7: max_connections_per_ip (256); 412
    refused in the last 60 s``."""

    def __init__(self, window: float = WINDOW, max_sources: int = MAX_SOURCES) -> None:
        self.window = window
        self.max_sources = max_sources
        # (verb, limit, source) -> its window
        self._open: dict[tuple[str, str, str], _Window] = {}
        self._new: list[tuple[str, str, str]] = []  # windows whose first line is not said

    def refused(
        self, limit: str, value: int | None, source: str, now: float, verb: str = "refusing"
    ) -> None:
        """One connection from ``source`` refused (or evicted, or dropped) by ``limit`` (set
        to ``value``; None for a refusal by a list, which has no value to show)."""
        key = (verb, limit, source)
        entry = self._open.get(key)
        if entry is None:
            if len(self._open) >= self.max_sources:
                key = (verb, limit, OTHERS)
                entry = self._open.get(key)
            if entry is None:
                entry = self._open[key] = _Window(now, value)
                self._new.append(key)
        entry.count += 1
        entry.value = value

    def say_new(self, now: float) -> None:
        """At the end of a turn: the first line of each spell that began a second ago."""
        if not self._new:
            return
        waiting = []
        for key in self._new:
            entry = self._open.get(key)
            if entry is None or entry.said_at is not None:
                continue
            if now - entry.start >= FIRST_DELAY:
                self._say(key, entry, now)
            else:
                waiting.append(key)
        self._new = waiting

    def flush(self, now: float) -> None:
        """End the windows that are over: a line for each that saw refusals since its last
        line; a window without any is forgotten."""
        for key, entry in list(self._open.items()):
            if now - entry.start >= self.window:
                if entry.count:
                    self._say(key, entry, now)
                    entry.start = now
                else:
                    del self._open[key]

    def _say(self, key: tuple[str, str, str], entry: _Window, now: float) -> None:
        since = entry.start if entry.said_at is None else entry.said_at
        verb, limit, source = key
        log.warning(
            "%s %s: %s%s; %d %s in the last %d s",
            verb,
            source,
            limit,
            "" if entry.value is None else f" ({entry.value})",
            entry.count,
            PAST.get(verb, "refused"),
            max(1, round(now - since)),
        )
        entry.count = 0
        entry.said_at = now
