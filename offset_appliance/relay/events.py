"""What the operator reads in the log about strangers: refusals by the relay's limits, one
warning line per limit and source at most once a minute, with how many were refused.

A flood from one address costs one line a minute, not one per connection; the number of
sources remembered is bounded, so a flood from many addresses cannot grow it either (the
excess is counted under ``other sources``).
"""

from __future__ import annotations

import logging

log = logging.getLogger("strelay")

WINDOW = 60.0
MAX_SOURCES = 1024
OTHERS = "other sources"


class _Window:
    """One limit's refusals of one source: since when, how many, the limit's last value."""

    __slots__ = ("start", "count", "value")

    def __init__(self, start: float, value: int | None) -> None:
        self.start = start
        self.count = 0
        self.value = value


class RefusalLog:
    """Rate-limited warnings: ``refusing 100.64.0.7: max_connections_per_ip (256); 412
    refused in the last 60 s``."""

    def __init__(self, window: float = WINDOW, max_sources: int = MAX_SOURCES) -> None:
        self.window = window
        self.max_sources = max_sources
        # (verb, limit, source) -> its window
        self._open: dict[tuple[str, str, str], _Window] = {}

    def refused(
        self, limit: str, value: int | None, source: str, now: float, verb: str = "refusing"
    ) -> None:
        """One connection from ``source`` refused (or evicted) by ``limit`` (set to ``value``;
        None for a refusal by a list, which has no value to show)."""
        key = (verb, limit, source)
        entry = self._open.get(key)
        if entry is None:
            if len(self._open) >= self.max_sources:
                key = (verb, limit, OTHERS)
                entry = self._open.get(key)
            if entry is None:
                # The first of a window is said at once; the rest when the window ends.
                self._open[key] = _Window(now, value)
                self._line(key, 1, value)
                return
        entry.count += 1
        entry.value = value
        if now - entry.start >= self.window:
            self._close_window(key, entry, now)

    def flush(self, now: float) -> None:
        """End the windows that are over: a line for each that saw refusals after its first."""
        for key, entry in list(self._open.items()):
            if now - entry.start >= self.window:
                self._close_window(key, entry, now)

    def _close_window(self, key: tuple[str, str, str], entry: _Window, now: float) -> None:
        if entry.count:
            self._line(key, entry.count, entry.value)
            entry.start, entry.count = now, 0
        else:
            del self._open[key]

    def _line(self, key: tuple[str, str, str], count: int, value: int | None) -> None:
        verb, limit, source = key
        past = "evicted" if verb == "evicting" else "refused"
        log.warning(
            "%s %s: %s%s; %d %s in the last %d s",
            verb,
            source,
            limit,
            "" if value is None else f" ({value})",
            count,
            past,
            self.window,
        )
