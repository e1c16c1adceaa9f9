"""systemd notifications (sd_notify): readiness, status, watchdog; silent outside systemd."""

from __future__ import annotations

import os

import sdnotify


class Notifier:
    """Sends sd_notify messages when NOTIFY_SOCKET is set, and does nothing otherwise."""

    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self._enabled else None

    def notify(self, message: str) -> None:
        """Send one notification (for example ``READY=1``); never raises."""
        if self._notifier is not None:
            self._notifier.notify(message)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if unwatched."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not self._enabled or not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None
