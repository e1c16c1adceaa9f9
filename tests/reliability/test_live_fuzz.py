"""Live fuzz: clients that damage valid sessions, at every layer, against a running strelay.

Each fuzz session is a real client (a ``wire.Connection``) following a plan of relay messages
(listen, connect, accept, reject, tunnel data, garbage, messages that are valid but make no
sense where they are), with one fault put in:

- on the byte stream: flipped bits, truncated frames, bogus length prefixes, reordered,
  duplicated, dropped or injected frames, unframed junk (in the version frame, in either
  handshake message, or in any encrypted frame);
- inside valid encryption: random or damaged ChannelMessage plaintext, a KaMessage or relay
  message that does not decode, rekeys with low-order or random keys, rekey floods.

Fuzz sessions never send keepalives, so every one of them must end up closed by the relay
(at a handshake, first-message or keepalive deadline if nothing else). Meanwhile an honest
tunnel streams checked data; it must never break. Tunnel data a fuzz session sent to a real
acceptor before its fault must arrive unaltered, and nothing else may.
"""

from __future__ import annotations

import random

import pytest
from nacl.signing import SigningKey

from offset_appliance.errors import ProtocolError
from offset_appliance.wire.fastpath import (
    encode_channel_user,
    encode_ka_message,
)
from offset_appliance.wire.frames import FrameDecoder, encode_frame
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    Listen,
    RejectConnection,
    Rekey,
    decode_init_connection,
    encode_channel_rekey,
    encode_init_connection,
)

from .honest import HonestTunnel
from .relaylib import (
    SOURCE_IPS,
    assert_probe_passes,
    assert_relay_clean,
    incoming_key,
    interesting,
    open_connections,
    scrape,
    settings,
    wait_metrics,
)
from .scale import rounds
from .swarm import Session, Swarm

SESSIONS = 600  # fuzz sessions per round
IN_FLIGHT = 80  # fuzz sessions open at once
TIMEOUTS = {"conn_timeout": 2.0, "relay_conn_timeout": 1.0, "keepalive": 4.0, "half_tunnel": 3.0}
# Every fuzz session goes silent after its plan, so the relay must close it within the
# longest of its deadlines (keepalive) plus the time to flush and notice.
CLOSE_BOUND = 30.0
LEAK_BOUND_KIB = 32 * 1024  # growth allowed between the end of the first and of a later round

FRAME_FAULTS = ("flip", "truncate", "length", "reorder", "duplicate", "drop", "inject", "junk")
PLAIN_FAULTS = (
    "random_plaintext",
    "damaged_channel_message",
    "undecodable_ka_message",
    "undecodable_relay_message",
    "low_order_rekey",
    "random_rekey",
    "rekey_flood",
    "damaged_rekey",
)


def _damage(rng: random.Random, data: bytes) -> bytes:
    """A valid encoding with bits flipped, cut short, extended or replaced."""
    choice = rng.randrange(4)
    if choice == 0 and data:
        raw = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw)
    if choice == 1:
        return data[: rng.randrange(len(data) + 1)]
    if choice == 2:
        return data + rng.randbytes(rng.randrange(1, 64))
    return rng.randbytes(rng.randrange(0, 64))


class FrameFault:
    """An output filter: splits our byte stream into frames and damages frame ``target``
    (0 is the version frame, 1 and 2 the handshake, 3 on the encrypted frames)."""

    def __init__(self, kind: str, target: int, rng: random.Random) -> None:
        self.kind = kind
        self.target = target
        self.rng = rng
        self.decoder = FrameDecoder(1 << 30)
        self.count = 0
        self.held: bytes | None = None
        self.stalled = False
        self.applied = False

    def __call__(self, data: bytes) -> bytes:
        if self.stalled:
            return b""
        out: list[bytes] = []
        for frame in self.decoder.feed(data):
            index = self.count
            self.count += 1
            raw = encode_frame(frame)
            if index == self.target:
                self.applied = True
                out.append(self._damage(frame, raw))
                if self.stalled:
                    break
            else:
                out.append(raw)
                if self.held is not None:
                    out.append(self.held)  # the held frame goes after the one that followed it
                    self.held = None
        return b"".join(out)

    def _damage(self, frame: bytes, raw: bytes) -> bytes:
        rng = self.rng
        kind = self.kind
        if kind == "flip":
            damaged = bytearray(raw)
            for _ in range(rng.randrange(1, 4)):
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
            return bytes(damaged)
        if kind == "truncate":
            self.stalled = True  # then nothing more: the relay's deadlines must end it
            return raw[: rng.randrange(len(raw))]
        if kind == "length":
            size = len(frame)
            bogus = rng.choice(
                [0, max(size - 1, 0), size + 1, size + rng.randrange(1, 4096), (1 << 20) + 1]
                + [rng.randrange(1 << 64), (1 << 64) - 1]
            )
            return bogus.to_bytes(8, "big") + frame
        if kind == "reorder":
            self.held = raw
            return b""
        if kind == "duplicate":
            return raw + raw
        if kind == "drop":
            return b""
        if kind == "inject":
            return encode_frame(rng.randbytes(rng.choice([0, 1, 4, 16, 100, 1000]))) + raw
        assert kind == "junk"
        return rng.randbytes(rng.randrange(1, 64)) + raw


class Plan:
    """What one fuzz session sends and what fault it carries."""

    def __init__(self, rng: random.Random, identity: SigningKey, target_key: bytes) -> None:
        self.identity = identity
        own = bytes(identity.verify_key)
        other = bytes(SigningKey.generate().verify_key)
        valid_first = {
            "listen": encode_init_connection(Listen()),
            "connect_target": encode_init_connection(Connect(target_key)),
            "connect_absent": encode_init_connection(Connect(other)),
            "connect_self": encode_init_connection(Connect(own)),
            "accept_absent": encode_init_connection(Accept(other)),
            "accept_self": encode_init_connection(Accept(own)),
            "incoming": IncomingConnection(other).encode(),
            "reject": RejectConnection(other).encode(),
            "empty": b"",
        }
        name = rng.choice([*valid_first, "damaged_init", "connect_target", "connect_target"])
        if name == "damaged_init":
            first = _damage(rng, rng.choice(list(valid_first.values())))
        else:
            first = valid_first[name]
        self.first_name = name
        followers = []
        for _ in range(rng.randrange(0, 5)):
            pick = rng.randrange(6)
            if pick == 0:
                followers.append(rng.randbytes(rng.choice([0, 1, 100, 4000, 200_000])))
            elif pick == 1:
                followers.append(RejectConnection(rng.choice([other, own, target_key])).encode())
            elif pick == 2:
                followers.append(encode_init_connection(Listen()))
            elif pick == 3:
                followers.append(encode_init_connection(Connect(target_key)))
            elif pick == 4:
                followers.append(encode_init_connection(Accept(other)))
            else:
                followers.append(_damage(rng, RejectConnection(other).encode()))
        self.messages = [first, *followers]
        # After a connect to the target listener every later message is tunnel data (and a
        # damaged first message may still be that connect).
        try:
            init = decode_init_connection(first)
        except ProtocolError:
            init = None
        self.tunnel_data = followers if init == Connect(target_key) else []
        self.delivered: list[bytes] = []
        self.frame_fault: FrameFault | None = None
        self.plain_fault: str | None = None
        self.plain_at = 0
        fault = rng.random()
        if fault < 0.55:
            kind = rng.choice(FRAME_FAULTS)
            self.frame_fault = FrameFault(kind, rng.randrange(3 + len(self.messages)), rng)
        elif fault < 0.95:
            self.plain_fault = rng.choice(PLAIN_FAULTS)
            self.plain_at = rng.randrange(len(self.messages) + 1)
        self.rng = rng

    @property
    def label(self) -> str:
        if self.frame_fault is not None:
            return f"{self.first_name}/{self.frame_fault.kind}@{self.frame_fault.target}"
        return f"{self.first_name}/{self.plain_fault or 'none'}"

    def run(self, swarm: Swarm, session: Session) -> None:
        """Send the plan on a session that just opened its secure channel."""
        for index, message in enumerate(self.messages):
            if self.plain_fault is not None and index == self.plain_at:
                self._plain_fault(swarm, session)
            if session.closed:
                return
            swarm.send(session, message)
        if self.plain_fault is not None and self.plain_at == len(self.messages):
            self._plain_fault(swarm, session)

    def _plain_fault(self, swarm: Swarm, session: Session) -> None:
        # Below the public API on purpose: the point is to reach the relay's decoders with
        # frames that decrypt correctly but carry hostile plaintext.
        assert session.wire is not None
        channel = session.wire._channel  # noqa: SLF001
        assert channel is not None
        rng = self.rng
        kind = self.plain_fault
        zero_key = bytes(32)
        if kind == "random_plaintext":
            frames = [channel._seal(rng.randbytes(rng.randrange(0, 300)))]
        elif kind == "damaged_channel_message":
            valid = encode_channel_user(rng.randbytes(8), encode_ka_message(b"x" * 40))
            frames = [channel._seal(_damage(rng, valid))]
        elif kind == "undecodable_ka_message":
            frames = [channel.seal(_damage(rng, encode_ka_message(rng.randbytes(20))))]
        elif kind == "undecodable_relay_message":
            bad = _damage(rng, encode_init_connection(Connect(zero_key)))
            frames = [channel.seal(encode_ka_message(bad))]
        elif kind == "low_order_rekey":
            frames = [channel._seal(encode_channel_rekey(b"", Rekey(zero_key, zero_key)))]
        elif kind == "random_rekey":
            frames = [channel._seal(encode_channel_rekey(b"", Rekey(rng.randbytes(32), zero_key)))]
        elif kind == "rekey_flood":
            frames = [
                channel._seal(encode_channel_rekey(b"", Rekey(rng.randbytes(32), zero_key)))
                for _ in range(50)
            ]
        else:
            assert kind == "damaged_rekey"
            valid = encode_channel_rekey(b"", Rekey(rng.randbytes(32), rng.randbytes(32)))
            frames = [channel._seal(_damage(rng, valid))]
        swarm.send_raw(session, b"".join(encode_frame(f) for f in frames))


def _fuzz_round(relay, round_no: int, figures) -> None:
    rng = random.Random(round_no * 104729 + 3)
    swarm = Swarm(relay.address, relay.public_key, keepalive=TIMEOUTS["keepalive"])
    honest = HonestTunnel(swarm)
    # A real listener that accepts every connect, so fuzz sessions get real tunnels.
    target_id = SigningKey.generate()
    target = swarm.open(target_id)
    target.on_open = lambda s: swarm.send(s, encode_init_connection(Listen()))
    plans_by_key: dict[bytes, Plan] = {}
    acceptors: list[Session] = []

    def on_incoming(_listener: Session, message: bytes) -> None:
        key = incoming_key(message)
        plan = plans_by_key[key]
        acceptor = swarm.open(target_id)

        def accept(s: Session) -> None:
            swarm.send(s, encode_init_connection(Accept(key)))
            swarm.send(s, b"welcome")

        acceptor.on_open = accept
        acceptor.on_message = lambda s, m: plan.delivered.append(m)
        acceptors.append(acceptor)

    target.on_message = on_incoming
    swarm.run_until(lambda: target.is_open and not target.pending, 30, "target listener")
    wait_metrics(relay, lambda v: v["offset_relay_listeners"] == 2, 30, "both listening")

    fuzzed: list[tuple[Plan, Session]] = []
    started = 0

    def launch() -> None:
        nonlocal started
        live = sum(1 for _, s in fuzzed if not s.closed)
        while started < SESSIONS and live < IN_FLIGHT:
            plan = Plan(rng, SigningKey.generate(), target_id.verify_key.encode())
            session = swarm.open(
                plan.identity, source=rng.choice(SOURCE_IPS), output_filter=plan.frame_fault
            )
            session.timers = False
            session.on_open = lambda s, plan=plan: plan.run(swarm, s)
            plans_by_key[session.public_key] = plan
            fuzzed.append((plan, session))
            started += 1
            live += 1

    def all_done() -> bool:
        launch()
        honest.pump()
        return started == SESSIONS and all(s.closed for _, s in fuzzed)

    swarm.run_until(all_done, 120 + CLOSE_BOUND, f"the relay to close {SESSIONS} fuzz sessions")
    honest_bytes = honest.check()
    assert honest_bytes > 0

    # Nobody but the relay closed a fuzz session (they never close on their own), unless our
    # own stack refused what came back after we damaged the handshake.
    for plan, session in fuzzed:
        assert session.close_reason != "closed by us", plan.label
        undamaged = plan.plain_fault is None and (
            plan.frame_fault is None or not plan.frame_fault.applied
        )
        if undamaged:
            assert session.protocol_error is None, (plan.label, session.protocol_error)
        # A real acceptor got exactly a prefix of what the session validly sent as tunnel
        # data; a damaged frame never decrypts, so nothing after it can arrive.
        if plan.plain_fault is None:
            got = plan.delivered
            assert got == plan.tunnel_data[: len(got)], plan.label
    swarm.run_until(
        lambda: all(a.closed for a in acceptors), CLOSE_BOUND, "acceptors of fuzz tunnels to close"
    )
    honest.pump()
    honest.check()
    values = wait_metrics(
        relay,
        lambda v: open_connections(v) == 4 and v["offset_relay_half_tunnels"] == 0,
        CLOSE_BOUND,
        "only the honest connections left",
    )
    assert values["offset_relay_listeners"] == 2, interesting(values)
    assert values["offset_relay_tunnels"] == 1, interesting(values)
    assert_relay_clean(relay)
    assert_probe_passes(relay)
    honest.check()
    swarm.close_all()
    figures.add("sessions_fuzzed", SESSIONS)
    figures.add("fuzz_tunnels_accepted", len(acceptors))


@pytest.mark.slow
def test_fuzzed_sessions_never_hurt_the_relay_or_an_honest_tunnel(relay_factory, figures):
    relay = relay_factory(settings(limits={"max_connections_per_ip": 64}, timeouts=TIMEOUTS))
    rss_start = relay.rss_kib()
    rss_first = 0
    for round_no in rounds("live_fuzz"):
        _fuzz_round(relay, round_no, figures)
        wait_metrics(relay, lambda v: open_connections(v) == 0, CLOSE_BOUND, "round closed")
        # The first round gives the relay its working set; later rounds must not add to it.
        rss = relay.rss_kib()
        rss_first = rss_first or rss
        assert rss - rss_first < LEAK_BOUND_KIB, (rss_first, rss)
    figures.rss("live_fuzz", rss_start, relay.rss_kib())
    values = scrape(relay)
    # The fuzz reached every layer: handshakes failed, and opened connections were closed
    # for protocol errors after the handshake.
    assert values['offset_relay_connections_closed_total{reason="protocol_error"}'] > 0
    assert sum(v for k, v in values.items() if "handshakes_failed_total" in k) > 0
    assert values["offset_relay_rekeys_total"] > 0
