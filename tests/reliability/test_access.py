"""Who may use the relay, on a live relay over real sockets: access lists by key and by
address, per-prefix counts, automatic bans and the memory ceiling; every key changed by
SIGHUP with tunnels open, and every bad value refused at start (exit 78) and at reload.

Loopback addresses ``127.0.0.x`` stand for distinct sources. Times are short settings, and
every wait polls with a deadline that is a liveness bound, not a speed requirement.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from offset_appliance.client import ClientError, ConnectionClosed, RelayClient
from offset_appliance.files import b64url_encode

from ..integration.conftest import tunnel
from .relaylib import METRICS, assert_relay_clean, closed, refused, scrape, wait_metrics

BIN = Path(sys.executable).parent
EX_CONFIG = 78
DEADLINE = 15.0


def key_of(identity: SigningKey) -> str:
    return b64url_encode(bytes(identity.verify_key))


def client_from(relay, ip: str, identity: SigningKey | None = None) -> RelayClient:
    """A handshaken client whose connection comes from ``ip`` (a loopback address)."""
    sock = socket.create_connection(relay.address, timeout=10, source_address=(ip, 0))
    client = RelayClient(sock, identity or SigningKey.generate(), expected_key=relay.public_key)
    try:
        client._handshake(time.monotonic() + 10)
    except BaseException:
        client.close()
        raise
    return client


def closed_at_once(relay, ip: str) -> bool:
    """Whether a connection from ``ip`` is closed before the relay says anything (a refusal
    at accept), rather than answered with the relay's version frame."""
    with socket.create_connection(relay.address, timeout=10, source_address=(ip, 0)) as sock:
        try:
            return sock.recv(64) == b""
        except ConnectionResetError:
            return True


def may_listen(relay, identity: SigningKey) -> bool:
    """Whether ``identity`` may listen: a refused listen is closed by the relay at once; an
    admitted one takes connects (checked with a connect from a fresh key)."""
    listener = relay.client(identity)
    try:
        listener.listen()
        connector = relay.client()
        try:
            connector.connect(listener.public_key)
            try:
                return listener.next_incoming(timeout=5) == connector.public_key
            except (ClientError, OSError):
                return False
        finally:
            connector.close()
    finally:
        listener.close()


def may_connect(relay, identity: SigningKey) -> bool:
    """Whether ``identity`` may connect (to a fresh listener): the listener hears of it, or
    the relay closes the connecting side."""
    listener = relay.client()
    listener.listen()
    connector = relay.client(identity)
    try:
        connector.connect(listener.public_key)
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                return listener.next_incoming(timeout=0.05) == connector.public_key
            except ConnectionClosed:
                return False
            except ClientError:  # nothing yet
                pass
            try:
                connector.receive(timeout=0.05)
            except ConnectionClosed:
                return False
            except ClientError:
                pass
        raise AssertionError("the connect was neither announced nor refused")
    finally:
        connector.close()
        listener.close()


def reload(relay, settings: str) -> None:
    """Write the relay's config (its start-up lines plus ``settings``), SIGHUP it and wait
    until the new configuration is read."""
    head = relay.config.read_text().split("# --\n", 1)[0]
    seen = relay.log_text().count("reload: configuration read")
    relay.config.write_text(head + "# --\n" + settings)
    relay.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + DEADLINE
    while relay.log_text().count("reload: configuration read") == seen:
        assert time.monotonic() < deadline, "no reload:\n" + relay.log_text()[-3000:]
        time.sleep(0.02)
    # The next turn of the loop applies it: a scrape is served after that.
    scrape(relay)


def carries(tunnel_ends, payload: bytes) -> bool:
    """The tunnel still carries a message both ways."""
    _, connector, acceptor = tunnel_ends
    connector.send(payload)
    acceptor.send(payload[::-1])
    return acceptor.receive(10) == payload and connector.receive(10) == payload[::-1]


# ---- access lists --------------------------------------------------------------------------


def test_a_denied_key_cannot_listen_and_an_allowed_one_can(relay_factory, tmp_path):
    ours, stranger, banned = (SigningKey.generate() for _ in range(3))
    key_file = tmp_path / "ours.keys"
    key_file.write_text(f"# our nodes\n{key_of(ours)}\n{key_of(banned)}\n")
    relay = relay_factory(
        METRICS + f'[access]\nlisten_allow = ["{key_file}"]\nlisten_deny = ["{key_of(banned)}"]\n'
    )
    assert may_listen(relay, ours)
    assert not may_listen(relay, stranger)
    assert not may_listen(relay, banned)  # deny wins over allow
    values = scrape(relay)
    assert refused(values, "listen_denied") == 2
    assert values['offset_relay_connections_closed_total{reason="listen_denied"}'] == 2
    # The allowed key's tunnels work end to end.
    assert carries(tunnel(relay, listener_id=ours), b"private relay")
    assert_relay_clean(relay)


def test_a_denied_key_cannot_connect(relay_factory):
    friend, foe = SigningKey.generate(), SigningKey.generate()
    relay = relay_factory(METRICS + f'[access]\nconnect_allow = ["{key_of(friend)}"]\n')
    assert may_connect(relay, friend)
    assert not may_connect(relay, foe)
    assert refused(scrape(relay), "connect_denied") == 1


def test_a_denied_address_is_closed_at_once_and_others_are_served(relay_factory):
    relay = relay_factory(METRICS + '[access]\nip_deny = ["127.0.0.2/32", "127.0.9.0/24"]\n')
    for ip in ("127.0.0.2", "127.0.9.77"):
        assert closed_at_once(relay, ip)
    assert not closed_at_once(relay, "127.0.0.3")
    client_from(relay, "127.0.0.3").close()
    values = wait_metrics(relay, lambda v: refused(v, "ip_denied") == 2, 10, "2 ip_denied")
    assert values["offset_relay_connections_accepted_total"] == 2


def test_an_address_prefix_counts_as_one_source(relay_factory):
    relay = relay_factory(METRICS + "[limits]\nipv4_prefix = 24\nmax_connections_per_ip = 3\n")
    held = [client_from(relay, f"127.0.5.{n}") for n in (1, 2, 3)]
    assert closed_at_once(relay, "127.0.5.4")  # a fourth address of the same /24
    other = client_from(relay, "127.0.6.1")  # another /24
    assert refused(scrape(relay), "max_connections_per_ip") == 1
    held.pop().close()
    deadline = time.monotonic() + DEADLINE
    while closed_at_once(relay, "127.0.5.9"):  # the relay counts the close a moment later
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for client in [*held, other]:
        client.close()


# ---- bans ----------------------------------------------------------------------------------


def test_a_source_refused_too_often_is_banned_and_the_ban_lifts(relay_factory):
    relay = relay_factory(
        METRICS + "[bans]\nenabled = true\nthreshold = 3\nwindow = 60\nban_time = 4\n"
    )
    started = time.monotonic()  # the ban starts after this, so it cannot lift before +4 s
    for _ in range(4):  # failed handshakes: a bad version frame
        with socket.create_connection(relay.address, source_address=("127.0.7.1", 0)) as sock:
            sock.sendall(b"\x00\x00\x00\x04\xff\xff\xff\xff")
            sock.settimeout(10)
            while sock.recv(4096):
                pass
    values = wait_metrics(relay, lambda v: v["offset_relay_bans_active"] == 1, 10, "a ban")
    assert values["offset_relay_bans_total"] == 1
    assert closed_at_once(relay, "127.0.7.1")
    client_from(relay, "127.0.7.2").close()  # only that source
    assert refused(scrape(relay), "banned") >= 1
    lines = [line for line in relay.lines if "banning 127.0.7.1" in line]
    assert len(lines) == 1 and "for 4 s: 4 refusals in 60 s (ban 1)" in lines[0]
    # The ban lifts after its time: served again.
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            client_from(relay, "127.0.7.1").close()
            break
        except (ClientError, OSError):
            assert time.monotonic() < deadline, relay.log_text()[-2000:]
            time.sleep(0.1)
    assert time.monotonic() - started >= 4  # served again, but not before the ban's end
    wait_metrics(relay, lambda v: v["offset_relay_bans_active"] == 0, 10, "no ban")
    # The gauge counts bans in force at the scrape; the line is the housekeeping's, every
    # 2 s: it may come a moment later.
    deadline = time.monotonic() + DEADLINE
    while not any("ban of 127.0.7.1 lifted" in line for line in relay.lines):
        assert time.monotonic() < deadline, relay.log_text()[-2000:]
        time.sleep(0.1)
    assert sum("ban of 127.0.7.1 lifted" in line for line in relay.lines) == 1
    assert_relay_clean(relay)


# ---- the memory ceiling --------------------------------------------------------------------


def rss_bytes(relay) -> int:
    return relay.rss_kib() * 1024


def test_past_the_memory_ceiling_new_connections_are_refused_until_usage_falls(relay_factory):
    relay = relay_factory(METRICS)
    client_from(relay, "127.0.0.1").close()  # warm up the paths a connection takes
    base = rss_bytes(relay)
    ceiling = base + (6 << 20)
    reload(relay, f"[limits]\nmax_memory = {ceiling}\nmemory_low_mark = {base + (3 << 20)}\n")
    client_from(relay, "127.0.0.1").close()  # below it: served
    # Fill half-tunnels (not accepted) with early data until the relay holds more.
    listener = relay.client()
    listener.listen()
    connectors = []
    for n in range(48):  # 512 KiB each, up to 24 MiB: the ceiling comes first
        try:
            connector = client_from(relay, f"127.0.8.{n + 1}")
        except (ClientError, OSError):
            break  # refused: over the ceiling already
        connector.connect(listener.public_key)
        connector.send_many([bytes([n]) * 65536] * 8)
        connectors.append(connector)
    values = wait_metrics(
        relay, lambda v: v["offset_relay_memory_ceiling_active"] == 1, DEADLINE, "the ceiling"
    )
    assert values["offset_relay_memory_rss_bytes"] > ceiling
    assert closed_at_once(relay, "127.0.0.1")
    assert refused(scrape(relay), "memory") >= 1
    assert any("memory ceiling: resident size" in line for line in relay.lines)
    # The half-tunnels go (the listener leaves): the memory is freed, and new connections
    # are served again once the resident size is below the low mark.
    listener.close()
    for connector in connectors:
        connector.close()
    values = wait_metrics(
        relay, lambda v: v["offset_relay_memory_ceiling_active"] == 0, DEADLINE, "below"
    )
    assert values["offset_relay_memory_rss_bytes"] < base + (3 << 20)
    client_from(relay, "127.0.0.1").close()
    assert values["offset_relay_memory_ceiling_seconds_total"] > 0
    # A ceiling raised by reload ends it too.
    reload(relay, "[limits]\nmax_memory = 1048576\n")
    assert closed_at_once(relay, "127.0.0.1")
    reload(relay, f"[limits]\nmax_memory = {1 << 34}\n")
    wait_metrics(relay, lambda v: v["offset_relay_memory_ceiling_active"] == 0, DEADLINE, "off")
    client_from(relay, "127.0.0.1").close()
    assert_relay_clean(relay)


# ---- every key by SIGHUP, tunnels open -------------------------------------------------------


def test_each_key_changes_by_sighup_with_tunnels_open(relay_factory, tmp_path):
    relay = relay_factory(METRICS + "# --\n")
    # The tunnel's keys are on every allow list below, as the lists it must outlive.
    ours, theirs = SigningKey.generate(), SigningKey.generate()
    ends = tunnel(relay, ours, theirs)
    assert carries(ends, b"before")
    member, outsider = SigningKey.generate(), SigningKey.generate()
    key_file = tmp_path / "listeners.keys"
    key_file.write_text(key_of(member) + "\n" + key_of(ours) + "\n")

    def bans_on() -> bool:
        for _ in range(3):
            with socket.create_connection(relay.address, source_address=("127.0.3.1", 0)) as s:
                s.sendall(b"\x00\x00\x00\x04\xff\xff\xff\xff")
                s.settimeout(10)
                while s.recv(4096):
                    pass
        return closed_at_once(relay, "127.0.3.1")

    def prefix_counts() -> bool:
        held = [client_from(relay, f"127.0.4.{n}") for n in (1, 2)]
        try:
            return closed_at_once(relay, "127.0.4.3")
        finally:
            for client in held:
                client.close()

    steps = [
        (
            f'[access]\nlisten_deny = ["{key_of(outsider)}"]\n',
            lambda: not may_listen(relay, outsider),
        ),
        (
            f'[access]\nlisten_allow = ["{key_file}"]\n',
            lambda: not may_listen(relay, outsider) and may_listen(relay, member),
        ),
        (
            f'[access]\nconnect_deny = ["{key_of(outsider)}"]\n',
            lambda: not may_connect(relay, outsider),
        ),
        (
            f'[access]\nconnect_allow = ["{key_of(member)}", "{key_of(theirs)}"]\n',
            lambda: not may_connect(relay, outsider) and may_connect(relay, member),
        ),
        ('[access]\nip_deny = ["127.0.2.0/24"]\n', lambda: closed_at_once(relay, "127.0.2.9")),
        (
            '[access]\nip_allow = ["127.0.0.0/24"]\n',
            lambda: closed_at_once(relay, "127.0.2.9") and not closed_at_once(relay, "127.0.0.7"),
        ),
        ("[limits]\nipv4_prefix = 24\nmax_connections_per_ip = 2\n", prefix_counts),
        ("[limits]\nipv6_prefix = 48\n", lambda: True),
        (
            "[limits]\nmax_memory = 1048576\nmemory_low_mark = 1000000\n",
            lambda: closed_at_once(relay, "127.0.0.8"),
        ),
        ("[bans]\nenabled = true\nthreshold = 2\nban_time = 600\n", bans_on),
        ("", lambda: may_listen(relay, outsider) and not closed_at_once(relay, "127.0.2.9")),
    ]
    for number, (settings, took_effect) in enumerate(steps):
        reload(relay, settings)
        assert took_effect(), f"step {number}: {settings}"
        assert carries(ends, f"after step {number}".encode()), settings
    # A key file's content is read again at each reload.
    reload(relay, f'[access]\nlisten_allow = ["{key_file}"]\n')
    assert not may_listen(relay, outsider)
    key_file.write_text(key_of(member) + "\n" + key_of(ours) + "\n" + key_of(outsider) + "\n")
    reload(relay, f'[access]\nlisten_allow = ["{key_file}"]\n')
    assert may_listen(relay, outsider)
    # Said per file: the setting's text did not change.
    assert f"reload: access.listen_allow: {key_file}: 2 -> 3 keys" in relay.log_text()
    assert carries(ends, b"at the end")
    assert_relay_clean(relay)


def test_a_reload_closes_the_tunnels_of_newly_denied_keys_and_addresses(relay_factory):
    relay = relay_factory(METRICS + "# --\n")
    # A tunnel whose listener's key will be denied, one whose connector's address will be,
    # and one neither.
    denied_key = SigningKey.generate()
    listener, connector, acceptor = tunnel(relay, denied_key)
    other = SigningKey.generate()
    other_listener = relay.client(other)
    other_listener.listen()
    from_denied = client_from(relay, "127.0.5.1")
    from_denied.connect(other_listener.public_key)
    assert other_listener.next_incoming() == from_denied.public_key
    other_acceptor = relay.client(other)
    other_acceptor.accept(from_denied.public_key)
    assert carries((other_listener, from_denied, other_acceptor), b"from .5.1")
    kept = tunnel(relay)
    assert carries(kept, b"before")
    reload(relay, f'[access]\nlisten_deny = ["{key_of(denied_key)}"]\nip_deny = ["127.0.5.0/24"]\n')
    # Closed at that reload: both ends of both tunnels (the denied ones, and their other
    # ends as the protocol closes a tunnel), and the denied key's listener.
    for end in (listener, acceptor, connector, from_denied, other_acceptor):
        end.wait_closed(DEADLINE)
    values = wait_metrics(
        relay,
        lambda v: closed(v, "denied") == 3 and closed(v, "tunnel_peer_closed") == 2,
        DEADLINE,
        "3 closes for denied, 2 for the tunnels' other ends",
    )
    assert refused(values, "listen_denied") == 0 and refused(values, "ip_denied") == 0
    assert (
        "reload: closed 3 connections the new access lists refuse (1 listener, 2 tunnel ends; "
        "the other ends of 2 tunnels close after their output)"
    ) in relay.log_text()
    # Untouched: the third tunnel carries, the other listener still takes connects.
    assert carries(kept, b"after")
    newcomer = relay.client()
    newcomer.connect(other_listener.public_key)
    assert other_listener.next_incoming() == newcomer.public_key
    newcomer.close()
    assert not may_listen(relay, denied_key) and closed_at_once(relay, "127.0.5.2")
    for end in (*kept, other_listener):
        end.close()
    assert_relay_clean(relay)


# ---- bad values: exit 78 at start, the running configuration kept at reload ----------------

BAD_VALUES = [
    (
        '[access]\nlisten_allow = ["not-a-key"]',
        "access.listen_allow: 'not-a-key' is not a public key",
    ),
    ('[access]\nlisten_deny = ["/nonexistent/keys"]', "access.listen_deny: cannot read key file"),
    ("[access]\nconnect_allow = 3", "access.connect_allow: expected a list of strings"),
    ('[access]\nconnect_deny = ["AAAA"]', "access.connect_deny: 'AAAA' is not a public key"),
    ('[access]\nip_allow = ["127.0.0.0/40"]', "access.ip_allow: '127.0.0.0/40' is not"),
    ('[access]\nip_deny = ["localhost"]', "access.ip_deny: 'localhost' is not"),
    ("[limits]\nipv4_prefix = 33", "limits.ipv4_prefix: must be between 8 and 32"),
    ("[limits]\nipv6_prefix = 8", "limits.ipv6_prefix: must be between 16 and 128"),
    ('[limits]\nmax_memory = "1G"', "limits.max_memory: expected a number"),
    (
        "[limits]\nmax_memory = 1000\nmemory_low_mark = 2000",
        "limits.memory_low_mark: memory_low_mark",
    ),
    ("[bans]\nenabled = 1", "bans.enabled: expected true or false"),
    ("[bans]\nthreshold = 0", "bans.threshold: must be between"),
    ("[bans]\nwindow = -1", "bans.window: must be between"),
    ("[bans]\nban_time = nan", "bans.ban_time: expected a finite number"),
    ("[bans]\nmultiplier = 0.5", "bans.multiplier: must be between"),
    ("[bans]\nmax_ban_time = 1", "bans.max_ban_time: max_ban_time (1) must not be below"),
    ("[bans]\nforget_after = 0", "bans.forget_after: must be between"),
    ("[bans]\ntable_size = 10", "bans.table_size: must be between"),
]


@pytest.mark.parametrize("bad, needle", BAD_VALUES, ids=[b.split("\n")[1] for b, _ in BAD_VALUES])
def test_a_bad_value_stops_the_relay_at_start_with_exit_78(tmp_path, bad, needle):
    ident = tmp_path / "relay.ident"
    subprocess.run([BIN / "stmgr", "gen-ident", "--output", ident], check=True)
    config = tmp_path / "relay.toml"
    config.write_text(f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n{bad}\n')
    result = subprocess.run(
        [BIN / "strelay", "--config", config], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(config) in lines[0], lines


def test_a_bad_value_at_reload_leaves_the_running_relay_unchanged(relay_factory):
    denied = SigningKey.generate()
    good = f'[access]\nlisten_deny = ["{key_of(denied)}"]\nip_deny = ["127.0.1.0/24"]\n'
    relay = relay_factory(METRICS + "# --\n")
    reload(relay, good)
    ends = tunnel(relay)
    for number, (bad, needle) in enumerate(BAD_VALUES):
        failures = relay.log_text().count("reload failed")
        # A drop-in-free config: the bad table replaces the good one in the file.
        relay.config.write_text(relay.config.read_text().split("# --\n")[0] + "# --\n" + bad + "\n")
        relay.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + DEADLINE
        while relay.log_text().count("reload failed") == failures:
            assert time.monotonic() < deadline, relay.log_text()[-2000:]
            time.sleep(0.02)
        line = [line for line in relay.lines if "reload failed" in line][-1]
        assert needle in line, (number, line)
        assert relay.proc.poll() is None
    # Still the good configuration: the lists hold, tunnels carry.
    assert not may_listen(relay, denied)
    assert closed_at_once(relay, "127.0.1.5")
    assert carries(ends, b"unchanged")
    assert relay.proc.poll() is None
    assert not [line for line in relay.lines if re.search(r"Traceback", line)]
