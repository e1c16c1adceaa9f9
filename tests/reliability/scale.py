"""How big the reliability scenarios run, and the figures a soak run reports.

``make test`` runs every scenario once at a size that finishes in seconds. ``make soak`` sets
``OFFSET_SOAK_SECONDS``: each scenario then repeats its rounds (against one relay process, so
that leaks accumulate where they can be seen) for its share of that time, and the figures
are written to ``OFFSET_SOAK_RESULTS`` (default ``tests/reliability/soak-results.json``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

SOAK_SECONDS = float(os.environ.get("OFFSET_SOAK_SECONDS") or 0)
SOAK = SOAK_SECONDS > 0
RESULTS = Path(
    os.environ.get("OFFSET_SOAK_RESULTS") or Path(__file__).with_name("soak-results.json")
)

# Each scenario's share of a soak run.
SHARES = {
    "fuzz_targets": 0.10,
    "live_fuzz": 0.20,
    "handshake_flood": 0.10,
    "connect_flood": 0.15,
    "connection_caps": 0.03,
    "idle_tunnels": 0.04,
    "never_reading": 0.05,
    "unaccepted": 0.04,
    "early_data": 0.03,
    "integrity": 0.17,
    "bursts": 0.05,
    "fd_exhaustion": 0.04,
}


def budget(scenario: str) -> float:
    """Seconds a scenario may keep repeating in a soak run (0 outside one)."""
    return SOAK_SECONDS * SHARES[scenario]


def rounds(scenario: str) -> Iterator[int]:
    """Round numbers: one round normally; in a soak run, rounds until the share is used."""
    deadline = time.monotonic() + budget(scenario)
    number = 0
    while True:
        yield number
        number += 1
        if time.monotonic() >= deadline:
            return


class Figures:
    """Counts the scenarios add up as they run; written out at the end of a soak run."""

    def __init__(self) -> None:
        self.started = time.time()
        self.counts: dict[str, int] = {}
        self.attacks: dict[str, int] = {}
        self.relay_rss_kib: dict[str, dict[str, int]] = {}

    def add(self, name: str, value: int = 1) -> None:
        """Add to a count (sessions fuzzed, tunnels checked, bytes checked, ...)."""
        self.counts[name] = self.counts.get(name, 0) + value

    def attack_held(self, name: str, times: int = 1) -> None:
        """Record that the relay held out against a round of an attack."""
        self.attacks[name] = self.attacks.get(name, 0) + times

    def rss(self, scenario: str, start_kib: int, end_kib: int) -> None:
        """The relay's resident memory at the start and end of a scenario."""
        self.relay_rss_kib[scenario] = {"start": start_kib, "end": end_kib}

    def write(self, path: Path, outcome: str) -> None:
        """The figures as JSON, with the soak's length and the test session's outcome."""
        doc = {
            "soak_seconds_requested": SOAK_SECONDS,
            "seconds_run": round(time.time() - self.started, 1),
            "outcome": outcome,
            **dict(sorted(self.counts.items())),
            "attacks_held": dict(sorted(self.attacks.items())),
            "relay_rss_kib": self.relay_rss_kib,
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")


FIGURES = Figures()
