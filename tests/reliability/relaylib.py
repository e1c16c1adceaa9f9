"""What the reliability scenarios share: relay settings, /metrics readings, log checks and
checked byte streams."""

from __future__ import annotations

import hashlib
import random
import re
import struct
import threading
import time
import urllib.error
import urllib.request

from offset_appliance.probe import HEALTHY, probe
from offset_appliance.wire.messages import IncomingConnection
from tests.helpers import scrape_url

METRICS = '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n'

# Loopback addresses used as distinct client source IPs (all of 127/8 is loopback).
SOURCE_IPS = tuple(f"127.0.{block}.{host}" for block in (1, 2) for host in range(1, 251))


def settings(limits: dict | None = None, timeouts: dict | None = None) -> str:
    """TOML for the relay: metrics on, plus the given limits and timeouts."""
    text = METRICS
    for table, values in (("limits", limits), ("timeouts", timeouts)):
        if values:
            text += f"[{table}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
    return text


# ---- /metrics ----------------------------------------------------------------------------


def metrics_address(relay) -> tuple[str, int]:
    """Where the relay serves /metrics (it logs the address once bound)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", relay.log_text())
        if match:
            return "127.0.0.1", int(match.group(1))
        time.sleep(0.02)
    raise AssertionError("no metrics address in the log:\n" + relay.log_text())


def scrape(relay) -> dict[str, float]:
    """Every sample of the relay's /metrics, by name with labels."""
    host, port = metrics_address(relay)
    return scrape_url(f"http://{host}:{port}/metrics")


def closed(values: dict[str, float], reason: str) -> float:
    """Connections closed for ``reason`` so far."""
    return values[f'offset_relay_connections_closed_total{{reason="{reason}"}}']


def refused(values: dict[str, float], limit: str) -> float:
    """Connections refused by ``limit`` so far."""
    return values[f'offset_relay_connections_refused_total{{limit="{limit}"}}']


def failed(values: dict[str, float], reason: str) -> float:
    """Handshakes that failed for ``reason`` so far."""
    return values[f'offset_relay_handshakes_failed_total{{reason="{reason}"}}']


def open_connections(values: dict[str, float]) -> float:
    """Connections the relay holds, in any state."""
    return sum(v for k, v in values.items() if k.startswith("offset_relay_connections{"))


def wait_metrics(
    relay, done, timeout: float, what: str, shed_scrapes: bool = False
) -> dict[str, float]:
    """Scrape until ``done(values)``: the relay counts a close a moment after the client sees
    it. The timeout is a liveness bound, not a speed requirement. ``shed_scrapes``: a relay
    still out of file descriptors rightly sheds the scrape's own connection (reset or closed
    unanswered) until it has processed the closes that free them; such a scrape is retried,
    and a scrape that answers is still needed before the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            values = scrape(relay)
        except (ConnectionError, urllib.error.URLError):
            if not shed_scrapes or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        if done(values):
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"relay metrics never showed {what}: {interesting(values)}")
        time.sleep(0.05)


def interesting(values: dict[str, float]) -> dict[str, float]:
    """The non-zero counters and gauges, for failure messages."""
    return {k: v for k, v in values.items() if v and "build_info" not in k and "start" not in k}


# ---- the relay's health ------------------------------------------------------------------


def assert_relay_clean(relay) -> None:
    """The relay is alive and its log has no traceback and no ERROR or CRITICAL line."""
    assert relay.proc.poll() is None, "the relay died:\n" + relay.log_text()[-4000:]
    text = relay.log_text()
    assert "Traceback" not in text, text[-4000:]
    bad = [line for line in relay.lines if re.search(r"\b(ERROR|CRITICAL)\b", line)]
    assert not bad, bad[:20]


def assert_probe_passes(relay, timeout: float = 20.0) -> None:
    """``stmgr probe``'s check: the relay proves its key and carries a message both ways."""
    result = probe(f"127.0.0.1:{relay.port}", relay.public_key, timeout)
    assert result.code == HEALTHY, result.message


class Prober(threading.Thread):
    """Runs ``stmgr probe``'s check against the relay over and over until stopped."""

    def __init__(self, relay) -> None:
        super().__init__(daemon=True)
        self.relay = relay
        self.results: list[tuple[int, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            result = probe(f"127.0.0.1:{self.relay.port}", self.relay.public_key, 20.0)
            self.results.append((result.code, result.message))
            self.stopping.wait(0.2)

    def finish(self) -> list[tuple[int, str]]:
        """Stop after the probe under way; every result, in order."""
        self.stopping.set()
        self.join(60)
        return self.results


# ---- checked streams ---------------------------------------------------------------------

_HEADER = struct.Struct(">IBI")  # tunnel number, direction, sequence number


class Stream:
    """One direction of one tunnel: deterministic random messages, each starting with a
    header naming its tunnel, direction and sequence number.

    The sender keeps the running SHA-256 of everything sent after each message; the receiver
    keeps its own over everything received. Equal digests after n messages prove that what
    arrived is a byte-exact prefix of what was sent; a foreign header proves a crossing.
    """

    def __init__(self, tunnel: int, direction: int, seed: int, quota: int, max_size: int):
        self.tunnel = tunnel
        self.direction = direction
        self.quota = quota
        self.max_size = max_size
        self._rng = random.Random(seed)
        self._sent_hash = hashlib.sha256()
        self._digests: list[bytes] = []
        self.sent_messages = 0
        self.sent_bytes = 0
        self._recv_hash = hashlib.sha256()
        self.received_messages = 0
        self.received_bytes = 0
        self.errors: list[str] = []

    @property
    def done_sending(self) -> bool:
        """Whether the quota has been sent."""
        return self.sent_bytes >= self.quota

    @property
    def complete(self) -> bool:
        """Whether everything was sent and everything sent was received."""
        return self.done_sending and self.received_messages == self.sent_messages

    @property
    def caught_up(self) -> bool:
        """Whether everything sent so far was received."""
        return self.received_messages == self.sent_messages

    def next_message(self) -> bytes:
        """The next message to send (sizes mostly small, sometimes up to ``max_size``)."""
        rng = self._rng
        size = rng.randrange(1, 2048) if rng.random() < 0.7 else rng.randrange(1, self.max_size)
        message = _HEADER.pack(self.tunnel, self.direction, self.sent_messages) + rng.randbytes(
            size
        )
        self._sent_hash.update(message)
        self._digests.append(self._sent_hash.digest())
        self.sent_messages += 1
        self.sent_bytes += len(message)
        return message

    def receive(self, message: bytes) -> None:
        """Check one received message against what was sent on this stream."""
        index = self.received_messages
        if len(message) >= _HEADER.size:
            tunnel, direction, seq = _HEADER.unpack_from(message)
            if (tunnel, direction) != (self.tunnel, self.direction):
                self.errors.append(
                    f"tunnel {self.tunnel}/{self.direction} got message {seq} of tunnel "
                    f"{tunnel}/{direction}"
                )
            elif seq != index:
                self.errors.append(
                    f"tunnel {self.tunnel}/{self.direction}: got {seq}, want {index}"
                )
        self._recv_hash.update(message)
        self.received_messages += 1
        self.received_bytes += len(message)
        if index >= len(self._digests):
            self.errors.append(f"tunnel {self.tunnel}/{self.direction}: more than was sent")
        elif self._recv_hash.digest() != self._digests[index]:
            self.errors.append(
                f"tunnel {self.tunnel}/{self.direction}: bytes differ in message {index}"
            )


def incoming_key(message: bytes) -> bytes:
    """The connecting key of an IncomingConnection notification."""
    return IncomingConnection.decode(message).public_key
