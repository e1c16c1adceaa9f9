"""Client processes that put load on the relay, and the handle the benchmark driver holds.

Each worker runs in its own process (``spawn``), so the load generators never share an
interpreter with the driver or with each other. A worker reports over a pipe (``("ready",
info)`` and the like, ``("error", text)``, and last ``("stopped", report)`` once told to
stop) and keeps running totals in a small shared array that the driver samples at the edges
of a measurement window.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import time
from collections import deque
from dataclasses import dataclass

from nacl.signing import SigningKey

from offset_appliance.client import RelayClient
from offset_appliance.errors import OffsetError
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    Listen,
    encode_init_connection,
)

from .links import Link, Loop
from .relay import BenchError

CTX = multiprocessing.get_context("spawn")
LISTEN = encode_init_connection(Listen())

# Slots of a worker's shared counters.
MESSAGES = 0  # relay messages received (tunnel data), or connections completed
BYTES = 1  # bytes received on open connections
FAILED = 2  # connections that ended unexpectedly
COUNTERS = 3

SETUP_CONCURRENCY = 64  # connections a worker keeps in set-up at once (max_handshakes is 512)
TUNNELS_PER_LISTENER = 100  # below the relay's 128 pending half-tunnels per listener


@dataclass(frozen=True)
class Target:
    """The relay under test: its address and the public key it must prove."""

    host: str
    port: int
    key: bytes

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) for ``socket.connect``."""
        return (self.host, self.port)


def payload_bytes(size: int, seed: int) -> bytes:
    """The message both ends of a tunnel agree on, so the receiver can check every byte."""
    return random.Random(seed).randbytes(size)


# ---- the driver's side ---------------------------------------------------------------------


class Worker:
    """A running client process, its pipe and its shared counters."""

    def __init__(self, name: str, function, *args) -> None:
        self.name = name
        self.counters = CTX.RawArray("Q", COUNTERS)
        self.pipe, child = CTX.Pipe()
        self.proc = CTX.Process(
            target=_worker_main, args=(function, child, self.counters, *args), daemon=True
        )
        self.proc.start()
        child.close()

    def expect(self, kind: str, timeout: float):
        """Wait for the worker's next report, which must be ``kind``; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            if self.pipe.poll(0.2):
                try:
                    got, value = self.pipe.recv()
                except EOFError:
                    raise BenchError(f"{self.name} exited unexpectedly") from None
                if got == "error":
                    raise BenchError(f"{self.name}: {value}")
                if got != kind:
                    raise BenchError(f"{self.name} reported {got!r} while {kind!r} was expected")
                return value
            if not self.proc.is_alive():
                raise BenchError(f"{self.name} exited with status {self.proc.exitcode}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not report {kind!r} within {timeout:.0f} s")

    def tell(self, command: str) -> None:
        """Send a command (``go``, ``stop``)."""
        try:
            self.pipe.send((command, None))
        except OSError:
            pass

    def count(self, slot: int) -> int:
        """One of the worker's running totals."""
        return self.counters[slot]

    def stop(self, timeout: float = 30.0):
        """Tell the worker to stop; returns its final report (None if it has none)."""
        self.tell("stop")
        try:
            return self.expect("stopped", timeout)
        except BenchError:
            return None
        finally:
            self.kill()

    def kill(self) -> None:
        """End the process if it is still running."""
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.pipe.close()


def total(workers: list[Worker], slot: int) -> int:
    """The sum of one counter over workers."""
    return sum(worker.count(slot) for worker in workers)


# ---- the worker's side ---------------------------------------------------------------------


class _Stopped(Exception):
    """The driver said stop while the worker waited for something else."""


def _worker_main(function, pipe, counters, *args) -> None:
    try:
        function(pipe, counters, *args)
    except _Stopped:
        pipe.send(("stopped", {}))
    except (BenchError, OffsetError, OSError) as exc:
        pipe.send(("error", str(exc) or type(exc).__name__))
    except Exception as exc:  # noqa: BLE001 - reported to the driver as one line
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))


class _Control:
    """Commands from the driver, read whenever the pipe is readable."""

    def __init__(self, pipe, loop: Loop | None = None) -> None:
        self.pipe = pipe
        self.commands: list[str] = []
        if loop is not None:
            loop.watch(pipe, self.read)

    def read(self) -> None:
        try:
            while self.pipe.poll():
                self.commands.append(self.pipe.recv()[0])
        except (EOFError, OSError):
            # The driver is gone: nobody is left to report to.
            raise SystemExit(0) from None

    @property
    def stopped(self) -> bool:
        return "stop" in self.commands

    def wait(self, command: str) -> None:
        """Block until ``command`` arrives."""
        while command not in self.commands:
            if "stop" in self.commands:
                raise _Stopped
            self.pipe.poll(None)
            self.read()


def _serve_until_stopped(loop: Loop, control: _Control, counters, counts) -> None:
    """Run the loop, publishing ``counts()`` into the shared counters, until told to stop."""
    while not control.stopped:
        loop.run_once(0.05)
        counts(counters)


# ---- handshakes ----------------------------------------------------------------------------


class _Handshakes:
    """Keeps ``concurrency`` connections in flight: handshake, send listen, close, repeat."""

    def __init__(self, loop: Loop, concurrency: int) -> None:
        self.loop = loop
        self.identities = [SigningKey.generate() for _ in range(4 * concurrency)]
        self.next = 0
        self.completed = 0
        self.failed = 0
        self.last_failure = ""
        for _ in range(concurrency):
            self.start()

    def start(self) -> None:
        self.next = (self.next + 1) % len(self.identities)
        self.loop.open(self.identities[self.next], self)

    def on_open(self, link: Link) -> None:
        self.loop.send(link, LISTEN)
        self.loop.close_after_flush(link)
        self.completed += 1
        self.start()

    def on_message(self, link: Link, message: bytes) -> None:
        pass  # a listen connection gets nothing before its first connect

    def on_close(self, link: Link, reason: str) -> None:
        self.failed += 1
        self.last_failure = reason
        self.start()


def handshake_worker(pipe, counters, target: Target, concurrency: int) -> None:
    """Complete connections (version, handshake, listen) back to back until stopped."""
    loop = Loop(target.address, target.key)
    control = _Control(pipe, loop)
    load = _Handshakes(loop, concurrency)
    pipe.send(("ready", None))

    def counts(shared) -> None:
        shared[MESSAGES] = load.completed
        shared[FAILED] = load.failed

    _serve_until_stopped(loop, control, counters, counts)
    counts(counters)
    loop.shutdown()
    report = {"completed": load.completed, "failed": load.failed, "last_failure": load.last_failure}
    pipe.send(("stopped", report))


# ---- idle listeners ------------------------------------------------------------------------


class _Listeners:
    """Opens ``count`` listen connections, ``SETUP_CONCURRENCY`` at a time, and holds them.

    A connection whose set-up fails is tried again, as a node would (a busy machine can
    time a handshake out); one that closes once open is lost."""

    def __init__(self, loop: Loop, count: int) -> None:
        self.loop = loop
        self.count = count
        self.started = 0
        self.opened = 0
        self.lost = 0
        self.setup_failures = 0
        self.last_failure = ""
        for _ in range(min(count, SETUP_CONCURRENCY)):
            self.start()

    def start(self) -> None:
        self.started += 1
        self.loop.open(SigningKey.generate(), self)

    def on_open(self, link: Link) -> None:
        self.loop.send(link, LISTEN)
        self.opened += 1
        if self.started < self.count:
            self.start()

    def on_message(self, link: Link, message: bytes) -> None:
        pass

    def on_close(self, link: Link, reason: str) -> None:
        self.last_failure = reason
        if link.open:
            self.lost += 1
            return
        self.setup_failures += 1
        if self.setup_failures > max(100, self.count // 10):
            raise BenchError(f"{self.setup_failures} connection set-ups failed: {reason}")
        self.started -= 1
        self.start()


def idle_worker(pipe, counters, target: Target, count: int, sources: tuple[str, ...] = ()) -> None:
    """Hold ``count`` listen connections, keepalives flowing both ways, until stopped (from
    ``sources``, loopback addresses taken in turn, if given)."""
    loop = Loop(target.address, target.key, sources)
    control = _Control(pipe, loop)
    listeners = _Listeners(loop, count)

    def counts(shared) -> None:
        shared[MESSAGES] = listeners.opened
        shared[BYTES] = loop.rx_bytes
        shared[FAILED] = listeners.lost

    loop.run_until(
        lambda: listeners.opened >= count or control.stopped,
        max(300, count / 50),
        f"{count} listen connections",
    )
    if listeners.lost:
        raise BenchError(f"{listeners.lost} connections closed in set-up: {listeners.last_failure}")
    loop.flush()
    pipe.send(("ready", None))
    _serve_until_stopped(loop, control, counters, counts)
    counts(counters)
    report = {
        "open": len(loop.links),
        "lost": listeners.lost,
        "setup_failures": listeners.setup_failures,
        "last_failure": listeners.last_failure,
        "received_keepalives": sum(1 for link in loop.links if link.rx_open_bytes),
        "keepalives_sent": loop.timer_frames,
        # Rekeys the relay started and this side completed, on the connections still open.
        "rekeys": sum(link.wire.rekeys for link in loop.links),
        "rekeyed_connections": sum(1 for link in loop.links if link.wire.rekeys),
    }
    loop.shutdown()
    pipe.send(("stopped", report))


# ---- tunnels -------------------------------------------------------------------------------


class _Tunnel:
    """Both ends of one tunnel: connector ``x`` and acceptor ``a``, each sending a window."""

    __slots__ = ("load", "x_id", "x_key", "listener", "x", "a", "sent", "received", "ready")

    def __init__(self, load: _TunnelLoad, listener: _Listener) -> None:
        self.load = load
        self.x_id = SigningKey.generate()
        self.x_key = bytes(self.x_id.verify_key)
        self.listener = listener
        self.x: Link | None = None
        self.a: Link | None = None
        # Indexed by the sending end: 0 is x -> a, 1 is a -> x.
        self.sent = [0, 0]
        self.received = [0, 0]
        self.ready = False

    def _fill(self, link: Link, direction: int) -> None:
        load = self.load
        window, payload, send = load.window, load.payload, load.loop.send
        while self.sent[direction] - self.received[direction] < window:
            send(link, payload)
            self.sent[direction] += 1

    def fill(self) -> None:
        """Put a whole window in flight both ways (once the tunnel is set up)."""
        if not self.ready:
            return
        self._fill(self.x, 0)  # type: ignore[arg-type]
        self._fill(self.a, 1)  # type: ignore[arg-type]

    def on_open(self, link: Link) -> None:
        # One message each way proves the tunnel; the window fills only on "go", so that
        # tunnels set up early do not load the relay while later ones are still being set up.
        send = self.load.loop.send
        if link is self.x:
            # Data may follow connect at once: the relay keeps it until the tunnel is accepted.
            send(link, encode_init_connection(Connect(self.listener.key)))
            direction = 0
        else:
            send(link, encode_init_connection(Accept(self.x_key)))
            direction = 1
        send(link, self.load.payload)
        self.sent[direction] += 1

    def on_message(self, link: Link, message: bytes) -> None:
        load = self.load
        if message != load.payload:
            raise BenchError("a tunnel delivered different bytes than were sent")
        load.received += 1
        # A message arriving at a was sent by x (direction 0), and the other way round.
        if link is self.a:
            self.received[0] += 1
            if load.pumping:
                self._fill(self.x, 0)  # type: ignore[arg-type]
        else:
            self.received[1] += 1
            if load.pumping:
                self._fill(self.a, 1)  # type: ignore[arg-type]
        if not self.ready and self.received[0] and self.received[1]:
            self.ready = True
            load.tunnel_ready()

    def on_close(self, link: Link, reason: str) -> None:
        raise BenchError(f"a tunnel connection ended: {reason}")


class _Listener:
    """A listen connection, opening the accepting end of each tunnel announced to it.

    Its connectors open one at a time: the next only once the relay has announced the
    previous one. The original strelay hands a listener its announcements through a channel
    of no spare capacity (components/relay/src/server/server_loop.rs:184, ``mpsc::channel(0)``)
    with ``try_send`` (line 248): a connect that arrives while the previous announcement to the
    same listener is still queued is dropped unannounced, and its connection closed. (A real
    node's connect pool tries again after a back-off, components/channeler/src/connect_pool.rs
    line 314.) Holding back only the connect message would not do: the original reads the
    first message of each new connection in turn (conn_processor.rs:101-113, ``filter_map``),
    so a silent connection stalls every connection behind it for up to 4 s, then is dropped.
    """

    def __init__(self, load: _TunnelLoad) -> None:
        self.load = load
        self.identity = SigningKey.generate()
        self.key = bytes(self.identity.verify_key)
        self.waiting: deque[_Tunnel] = deque()  # tunnels whose connector is not opened yet
        self.connecting: _Tunnel | None = None  # the connect not announced yet
        self.open = False
        self.link = load.loop.open(self.identity, self)

    def add(self, tunnel: _Tunnel) -> None:
        """Queue a tunnel; its connector opens when no other connect awaits announcement."""
        self.waiting.append(tunnel)
        self._next()

    def _next(self) -> None:
        if self.connecting is None and self.waiting:
            tunnel = self.connecting = self.waiting.popleft()
            tunnel.x = self.load.loop.open(tunnel.x_id, tunnel)

    def on_open(self, link: Link) -> None:
        self.load.loop.send(link, LISTEN)
        self.open = True

    def on_message(self, link: Link, message: bytes) -> None:
        key = IncomingConnection.decode(message).public_key
        tunnel = self.connecting
        if tunnel is None or key != tunnel.x_key:
            raise BenchError("the relay announced a connect nobody made")
        self.connecting = None
        tunnel.a = self.load.loop.open(self.identity, tunnel)
        self._next()

    def on_close(self, link: Link, reason: str) -> None:
        raise BenchError(f"a listen connection ended: {reason}")


class _TunnelLoad:
    """``count`` tunnels, each carrying ``window`` messages in flight in each direction."""

    def __init__(self, loop: Loop, count: int, window: int, payload: bytes) -> None:
        self.loop = loop
        self.count = count
        self.window = window
        self.payload = payload
        self.received = 0
        self.pumping = False  # True once the driver said "go"
        self.tunnels: list[_Tunnel] = []
        self.in_setup = 0
        self.ready = 0
        self.listeners = [_Listener(self) for _ in range(math.ceil(count / TUNNELS_PER_LISTENER))]

    def start(self) -> None:
        """Start tunnels until ``SETUP_CONCURRENCY`` are being set up (one connect per listener
        at a time: see ``_Listener``)."""
        while self.in_setup < SETUP_CONCURRENCY and len(self.tunnels) < self.count:
            listener = self.listeners[len(self.tunnels) % len(self.listeners)]
            tunnel = _Tunnel(self, listener)
            self.tunnels.append(tunnel)
            self.in_setup += 1
            listener.add(tunnel)

    def tunnel_ready(self) -> None:
        self.ready += 1
        self.in_setup -= 1
        self.start()

    def go(self) -> None:
        """Start the load: every tunnel keeps a full window in flight from now on."""
        self.pumping = True
        for tunnel in self.tunnels:
            tunnel.fill()


def open_tunnels(
    loop: Loop, count: int, window: int, payload: bytes, stopped=lambda: False
) -> _TunnelLoad:
    """Set up ``count`` tunnels (one message through each, both ways) on ``loop``."""
    load = _TunnelLoad(loop, count, window, payload)
    loop.run_until(
        lambda: all(listener.open for listener in load.listeners) and not loop.output_pending,
        60,
        "listen connections",
    )
    # Connectors start only now: a connect the relay reads before the listen is refused.
    load.start()
    loop.run_until(lambda: load.ready >= count or stopped(), 600, f"{count} tunnels")
    return load


def tunnel_worker(
    pipe, counters, target: Target, count: int, window: int, size: int, seed: int
) -> None:
    """Set up ``count`` tunnels and keep messages of ``size`` bytes flowing both ways."""
    loop = Loop(target.address, target.key)
    control = _Control(pipe, loop)
    load = open_tunnels(loop, count, window, payload_bytes(size, seed), lambda: control.stopped)
    pipe.send(("ready", {"connections": len(loop.links)}))
    loop.run_until(lambda: "go" in control.commands or control.stopped, 600, "the start")
    load.go()

    def counts(shared) -> None:
        shared[MESSAGES] = load.received
        shared[BYTES] = loop.rx_bytes

    _serve_until_stopped(loop, control, counters, counts)
    counts(counters)
    report = {"received": load.received, "rx_bytes": loop.rx_bytes, "open": len(loop.links)}
    loop.shutdown()
    pipe.send(("stopped", report))


# ---- bulk ----------------------------------------------------------------------------------


def bulk_receiver(pipe, counters, target: Target, count: int, size: int, seed: int) -> None:
    """Listen, accept one tunnel, then receive and check ``count`` messages."""
    control = _Control(pipe)
    payload = payload_bytes(size, seed)
    identity = SigningKey.generate()
    with RelayClient.open(target.address, identity, expected_key=target.key, timeout=30) as node:
        node.listen()
        pipe.send(("listening", node.public_key))
        peer = node.next_incoming(30)
        with RelayClient.open(
            target.address, identity, expected_key=target.key, timeout=30
        ) as acceptor:
            acceptor.accept(peer)
            if acceptor.receive(30) != payload:
                raise BenchError("the tunnel delivered different bytes than were sent")
            pipe.send(("ready", None))
            received = 0
            receive = acceptor.receive
            while received < count:
                if receive(60) != payload:
                    raise BenchError("the tunnel delivered different bytes than were sent")
                received += 1
                counters[MESSAGES] = received
            pipe.send(("done", {"received": received, "finished": time.monotonic()}))
            control.wait("stop")
    pipe.send(("stopped", {}))


def bulk_sender(
    pipe, counters, target: Target, listener: bytes, count: int, size: int, seed: int
) -> None:
    """Connect to ``listener``, wait for ``go``, then send ``count`` messages as fast as allowed."""
    control = _Control(pipe)
    payload = payload_bytes(size, seed)
    batch = [payload] * 16
    with RelayClient.open(target.address, expected_key=target.key, timeout=30) as node:
        node.connect(listener)
        node.send(payload)  # establishes the tunnel before the clock starts
        pipe.send(("ready", None))
        control.wait("go")
        started = time.monotonic()
        sent = 0
        while sent < count:
            step = min(len(batch), count - sent)
            node.send_many(batch if step == len(batch) else batch[:step])
            sent += step
            counters[MESSAGES] = sent
        pipe.send(("done", {"started": started, "finished": time.monotonic()}))
        control.wait("stop")
    pipe.send(("stopped", {}))
