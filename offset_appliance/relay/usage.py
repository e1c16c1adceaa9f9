"""Transfer counts for budgets: bytes read from clients per public key, per IP prefix and for
the whole relay, per UTC day and per UTC calendar month, and the state file that keeps them
across restarts.

The state file is JSON, written atomically (a temporary file beside it, fsync, rename, fsync
of the directory), so a crash leaves the old file or the new one, never half of one::

    {"format": "offset-relay-usage", "version": 1, "saved": "2026-11-30T14:00:00Z",
     "day": "2026-11-30", "month": "2026-11", "total": [DAY, MONTH],
     "keys": {"<public key, base64url>": [DAY, MONTH], ...},
     "prefixes": {"198.18.0.7": [DAY, MONTH], "2001:db8:1:2::/64": [DAY, MONTH], ...}}

``stmgr usage`` reads the same file (``read_usage_file``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMAT = "offset-relay-usage"
VERSION = 1
# Keys and prefixes counted at once, each table: past it the quarter with the least traffic
# this month is forgotten (far from any budget, they cannot use this to dodge one).
MAX_ENTRIES = 1 << 16
# A state file larger than this is not one the relay wrote (2 tables of MAX_ENTRIES lines).
MAX_FILE_BYTES = 64 << 20
INF = float("inf")


class UsageFileError(ValueError):
    """A state file that cannot be read, or is not one the relay writes."""


def period_of(wall: float) -> tuple[str, str]:
    """The UTC day ("2026-11-30") and month ("2026-11") of a time since the epoch."""
    moment = time.gmtime(wall)
    return time.strftime("%Y-%m-%d", moment), time.strftime("%Y-%m", moment)


class Scope:
    """What one table counts, and its budgets (``INF`` for none)."""

    __slots__ = ("name", "day_limit", "month_limit")

    def __init__(self, name: str) -> None:
        self.name = name
        self.day_limit: float = INF
        self.month_limit: float = INF

    def set_limits(self, daily: int, monthly: int) -> None:
        self.day_limit = daily or INF
        self.month_limit = monthly or INF


class Entry:
    """The counts of one key, one prefix or the whole relay."""

    __slots__ = ("scope", "name", "day", "month", "over")

    def __init__(self, scope: Scope, name: str, day: int = 0, month: int = 0) -> None:
        self.scope = scope
        self.name = name
        self.day = day
        self.month = month
        self.over = False

    def is_over(self) -> bool:
        scope = self.scope
        return self.day >= scope.day_limit or self.month >= scope.month_limit


class Usage:
    """The counts of the current day and month."""

    def __init__(self, wall: float) -> None:
        self.day, self.month = period_of(wall)
        self.key_scope = Scope("key")
        self.prefix_scope = Scope("prefix")
        self.total_scope = Scope("total")
        self.keys: dict[str, Entry] = {}
        self.prefixes: dict[str, Entry] = {}
        self.total = Entry(self.total_scope, "total")

    def entry(self, table: dict[str, Entry], scope: Scope, name: str) -> tuple[Entry, bool]:
        """The entry of ``name``, made if new; True if the table was pruned to make room."""
        found = table.get(name)
        if found is not None:
            return found, False
        pruned = False
        if len(table) >= MAX_ENTRIES:
            keep = sorted(table.values(), key=lambda e: e.month, reverse=True)
            keep = keep[: MAX_ENTRIES * 3 // 4]
            table.clear()
            table.update((e.name, e) for e in keep)
            pruned = True
        made = table[name] = Entry(scope, name)
        return made, pruned

    def entries(self) -> Iterator[Entry]:
        """Every count: the relay's, each key's, each prefix's."""
        yield self.total
        yield from self.keys.values()
        yield from self.prefixes.values()

    def behind(self, wall: float) -> bool:
        """Whether ``wall`` is before the current day: the clock was stepped back (periods
        only go forward, so that no byte is counted in a period twice)."""
        return period_of(wall)[0] < self.day

    def roll(self, wall: float) -> bool:
        """Start a new day (and month) when the UTC date has moved on; True if it did. A
        clock stepped back keeps the current period until it passes it again."""
        day, month = period_of(wall)
        if day <= self.day:
            return False
        new_month = month != self.month
        for entry in self.entries():
            entry.day = 0
            if new_month:
                entry.month = 0
            entry.over = entry.is_over()
        for table in (self.keys, self.prefixes):
            for name in [name for name, entry in table.items() if not entry.month]:
                del table[name]
        self.day, self.month = day, month
        return True

    def refresh_over(self) -> list[Entry]:
        """Re-evaluate every entry against the budgets; returns the newly over ones."""
        newly = []
        for entry in self.entries():
            over = entry.is_over()
            if over and not entry.over:
                newly.append(entry)
            entry.over = over
        return newly

    def over_counts(self) -> dict[str, int]:
        """Keys, prefixes (and the relay) currently over a budget."""
        return {
            "key": sum(1 for e in self.keys.values() if e.over),
            "prefix": sum(1 for e in self.prefixes.values() if e.over),
            "total": int(self.total.over),
        }

    # ---- the document ------------------------------------------------------------------

    def document(self, wall: float) -> dict[str, Any]:
        """The counts as the state file holds them."""

        def table(entries: dict[str, Entry]) -> dict[str, list[int]]:
            return {name: [e.day, e.month] for name, e in entries.items() if e.month or e.day}

        return {
            "format": FORMAT,
            "version": VERSION,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall)),
            "day": self.day,
            "month": self.month,
            "total": [self.total.day, self.total.month],
            "keys": table(self.keys),
            "prefixes": table(self.prefixes),
        }

    def take(self, document: object, wall: float) -> None:
        """Replace the counts with those of a document (checked first: ``UsageFileError``),
        keeping what still belongs to the current day and month."""
        doc = check_document(document)
        day, month = period_of(wall)
        if doc["day"] > day:
            # Written in a later period than the clock reads now (it was stepped back): the
            # counts go on in that period rather than being lost.
            day, month = doc["day"], doc["month"]
        same_month = doc["month"] == month
        same_day = same_month and doc["day"] == day
        self.day, self.month = day, month
        self.keys.clear()
        self.prefixes.clear()

        def counts(pair: list[int]) -> tuple[int, int]:
            return (pair[0] if same_day else 0), (pair[1] if same_month else 0)

        self.total.day, self.total.month = counts(doc["total"])
        for table, scope, source in (
            (self.keys, self.key_scope, doc["keys"]),
            (self.prefixes, self.prefix_scope, doc["prefixes"]),
        ):
            for name, pair in source.items():
                d, m = counts(pair)
                if d or m:
                    table[name] = Entry(scope, name, d, m)
        self.refresh_over()


def _pair(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(type(n) is int and n >= 0 for n in value)
        and value[0] <= value[1]
    )


def check_document(document: object) -> dict[str, Any]:
    """``document`` if it is a state file's content, else ``UsageFileError`` saying why."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UsageFileError("not a usage state file")
    if document.get("version") != VERSION:
        raise UsageFileError(f"usage state version {document.get('version')!r}, expected 1")
    for key, length in (("day", 10), ("month", 7)):
        value = document.get(key)
        if not isinstance(value, str) or len(value) != length:
            raise UsageFileError(f"{key!r} missing or not a date")
    if not _pair(document.get("total")):
        raise UsageFileError("'total' is not a pair of byte counts")
    for key in ("keys", "prefixes"):
        table = document.get(key)
        if not isinstance(table, dict):
            raise UsageFileError(f"{key!r} is not a table")
        if len(table) > MAX_ENTRIES:
            raise UsageFileError(f"{key!r} has {len(table)} entries, at most {MAX_ENTRIES}")
        for name, pair in table.items():
            if not (isinstance(name, str) and 0 < len(name) <= 64) or not _pair(pair):
                raise UsageFileError(f"{key!r} entry {str(name)[:64]!r} is not a pair of counts")
    return document


def read_usage_file(path: Path) -> dict[str, Any]:
    """The checked document of a state file. ``FileNotFoundError`` if there is none,
    ``OSError`` if it cannot be read, ``UsageFileError`` if it is damaged."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise UsageFileError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageFileError(f"not JSON: {exc}") from None
    return check_document(document)


def write_usage_file(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically (readable by the relay's user only)."""
    data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        # A disk that filled, a file system remounted read-only: the good file stays, and
        # no partial one is left beside it.
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
