"""Keepalive deadlines (docs/protocol.md section 4), kept as plain numbers: time is passed in."""

from __future__ import annotations

from typing import TypedDict


class KeepaliveExport(TypedDict):
    """``Keepalive.export_state``: the deadlines as seconds already elapsed."""

    interval: float
    since_recv: float
    since_send: float
    paused: bool


class Keepalive:
    """Tracks when the peer last sent us a KaMessage and when we last sent it one.

    Only KaMessages count, either variant, as in the original, whose keepalive layer sits
    above the secure channel and never sees a Rekey frame. No KaMessage received for
    ``interval`` seconds means the peer is gone; none sent for half of it means we owe the
    peer a keepalive. While reading is paused for back-pressure the receive deadline is
    suspended (ours; docs/protocol.md section 4).
    """

    __slots__ = ("interval", "half", "last_recv", "last_send", "paused")

    def __init__(self, now: float, interval: float) -> None:
        self.interval = interval
        self.half = interval / 2
        self.last_recv = now
        self.last_send = now
        self.paused = False

    def pause(self) -> None:
        """Reading stopped on purpose: the peer's silence is ours, not theirs."""
        self.paused = True

    def resume(self, now: float) -> None:
        """Reading resumed: the peer gets a whole interval again."""
        self.paused = False
        self.last_recv = now

    def recv_deadline(self) -> float:
        """When the connection dies of silence (infinity while paused)."""
        return float("inf") if self.paused else self.last_recv + self.interval

    def send_deadline(self) -> float:
        """When a keepalive is due if nothing else is sent first."""
        return self.last_send + self.half

    def next_deadline(self) -> float:
        """The earlier of the two deadlines."""
        return min(self.recv_deadline(), self.send_deadline())

    def timed_out(self, now: float) -> bool:
        """Whether the peer has been silent too long."""
        return not self.paused and now >= self.last_recv + self.interval

    def keepalive_due(self, now: float) -> bool:
        """Whether we must send a keepalive now."""
        return now >= self.last_send + self.half

    # ---- hand-over (relay/handover.py) ------------------------------------------------

    def export_state(self, now: float) -> KeepaliveExport:
        """The deadlines as time already elapsed (a clock's origin does not travel)."""
        return {
            "interval": self.interval,
            "since_recv": now - self.last_recv,
            "since_send": now - self.last_send,
            "paused": self.paused,
        }

    @classmethod
    def restore_state(cls, state: KeepaliveExport, now: float, downtime: float) -> Keepalive:
        """Rebuild from ``export_state``. ``downtime`` (the seconds no process served the
        connection) counts against what we owe the peer, not against the peer: its bytes
        of that time wait in the socket and are read first."""
        interval, since_recv, since_send = (
            float(state["interval"]),
            float(state["since_recv"]),
            float(state["since_send"]),
        )
        if not interval > 0 or since_recv < 0 or since_send < 0:
            raise ValueError("keepalive state out of range")
        keepalive = cls(now, interval)
        keepalive.last_recv = now - since_recv
        keepalive.last_send = now - since_send - downtime
        keepalive.paused = bool(state["paused"])
        return keepalive
