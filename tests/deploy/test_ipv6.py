"""The relay over IPv6 on a booted bookworm host: one /64 counts as one source.

One host of a rig with IPv6 (two unique local /64s on its bridge: the host is in A, B is
on-link), the package installed and a drop-in making the relay listen on ``[::]:4567``
beside ``0.0.0.0:4567``, with ``ipv6_prefix = 64``. The controller binds its connections
to addresses of its own in A and in B, each address used for one connection or probe, so
that only the relay's prefix arithmetic can join them into one source. Proven live over
the rig's network, each test on a freshly restarted relay (bans and connection-rate
buckets are not handed over) with its own limits:

1. ``max_connections_per_ip``: four connections from four addresses of A fill the cap; a
   fifth from yet another address of A is closed at once, counted as that refusal; B is
   served meanwhile; once one of A's closes, A is served again.
2. The connection rate: from fresh addresses of A one after another, the burst is served,
   then they are refused (``connection_rate``), never more served than the burst and the
   refill over the time taken allow; B's own burst is served in full after that.
3. Bans: refusals from four addresses of A, one each, ban A as one source (one journal
   line names the /64); a fifth address of A is then refused as banned; B is served.
4. A ticket made on the host with ``stmgr relay-ticket --address [IPv6]:4567`` probes OK
   from the controller (``stmgr probe``), and a tunnel through that address carries data
   both ways.

Refusals are seen the way tests/reliability/test_access.py sees them: the connection is
closed before the relay says anything, and the relay's /metrics counts it under the limit.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from offset_appliance.client import RelayClient
from offset_appliance.files import b64url_decode, split_host_port
from tests.helpers import scrape_url

from .rig import Host, Rig
from .test_package import probe
from .test_restart import (
    APT,
    DROP_INS,
    PORT,
    journal_cursor,
    journal_since,
    relay_key,
    unit,
    wait_active,
    wait_for,
)

pytestmark = pytest.mark.deploy

IDENTITY = "/var/lib/offset-relay/relay.ident"
DROP_IN = f"{DROP_INS}/60-test-ipv6.toml"
METRICS_PORT = 9477
SOURCES = 24  # addresses the controller takes in each /64, one a connection
BURST = 6
# Far above anything these tests open: a limit not under test never refuses.
UNLIMITED = 100000


@pytest.fixture(scope="module")
def rig(make_rig: Callable[..., Rig], deb_package: Path) -> Rig:
    return make_rig(1, name="ipv6", repo_debs=[deb_package], ipv6=True)


@pytest.fixture(scope="module")
def host(rig: Rig) -> Host:
    host = rig.hosts[0]
    assert host.address6 is not None and ipaddress.IPv6Address(host.address6).is_private
    host.ssh(f"{APT} update")
    result = host.ssh(f"{APT} install offset-relay 2>&1", check=False, timeout=600)
    assert result.returncode == 0, f"apt install failed:\n{result.stdout[-4000:]}"
    return host


@pytest.fixture(scope="module")
def key(host: Host) -> bytes:
    """The relay's public key (from its journal)."""
    return relay_key(host)


@pytest.fixture(scope="module")
def sources(rig: Rig) -> Iterator[tuple[list[str], list[str]]]:
    """The controller's source addresses in /64 A and in /64 B, removed at the end."""
    added: list[str] = []
    try:
        for subnet in rig.ipv6_subnets:
            added += rig.add_addresses6(subnet, SOURCES, start=0x1000)
        yield added[:SOURCES], added[SOURCES:]
    finally:
        rig.remove_addresses6(added)


def configure(host: Host, limits: str, bans: str = "enabled = false\n") -> None:
    """Restart the relay with ``limits`` and ``bans`` (the bodies of those tables) beside
    its IPv6 listener and a /metrics the controller reaches; a restart forgets bans and
    connection-rate buckets."""
    host.write(
        DROP_IN,
        'listen = ["0.0.0.0:4567", "[::]:4567"]\n\n'
        f"[limits]\nipv6_prefix = 64\n{limits}\n"
        f"[bans]\n{bans}\n"
        f'[metrics]\nenabled = true\nlisten = "{host.address}:{METRICS_PORT}"\n',
    )
    host.ssh("systemctl restart offset-relay")
    wait_active(host)
    wait_for("the relay's /metrics", lambda: _scrapes(host))


def _scrapes(host: Host) -> bool:
    try:
        scrape(host)
    except OSError:
        return False
    return True


def scrape(host: Host) -> dict[str, float]:
    """Every sample of the relay's /metrics, by name with labels."""
    return scrape_url(f"http://{host.address}:{METRICS_PORT}/metrics")


def refused(values: dict[str, float], limit: str) -> float:
    return values.get(f'offset_relay_connections_refused_total{{limit="{limit}"}}', 0.0)


def wait_refused(host: Host, limit: str, count: int) -> dict[str, float]:
    """Scrape until the relay has counted ``count`` refusals by ``limit`` since its start
    (it counts a moment after the client sees the close), and check there are no more."""
    values: dict[str, float] = {}

    def counted() -> bool:
        values.update(scrape(host))
        return refused(values, limit) >= count

    wait_for(f"{count} refusals by {limit}", counted, timeout=15)
    assert refused(values, limit) == count, values
    return values


def _connection(host: Host, source: str) -> socket.socket:
    assert host.address6 is not None
    sock = socket.create_connection((host.address6, PORT), timeout=10, source_address=(source, 0))
    assert sock.getsockname()[0] == source
    return sock


def client_from(host: Host, key: bytes, source: str) -> RelayClient:
    """A handshaken client of the relay's IPv6 listener (public key ``key``), whose
    connection comes from ``source`` (one of the controller's addresses)."""
    client = RelayClient(_connection(host, source), SigningKey.generate(), expected_key=key)
    try:
        client._handshake(time.monotonic() + 10)
    except BaseException:
        client.close()
        raise
    return client


def closed_at_once(host: Host, source: str) -> bool:
    """Whether a connection from ``source`` is closed before the relay says anything (a
    refusal at accept), rather than answered with the relay's version frame."""
    with _connection(host, source) as sock:
        try:
            return sock.recv(64) == b""
        except ConnectionResetError:
            return True


def test_a_64_is_one_source_for_the_connection_cap(
    host: Host, key: bytes, sources: tuple[list[str], list[str]]
) -> None:
    configure(
        host,
        "max_connections_per_ip = 4\n"
        f"new_connections_per_ip_per_second = {UNLIMITED}\n"
        f"new_connections_per_ip_burst = {UNLIMITED}\n",
    )
    a, b = sources
    accepted = scrape(host)["offset_relay_connections_accepted_total"]
    held = [client_from(host, key, ip) for ip in a[:4]]
    try:
        assert closed_at_once(host, a[4])  # a fifth address of the same /64
        held.append(client_from(host, key, b[0]))  # another /64
        values = wait_refused(host, "max_connections_per_ip", 1)
        assert values["offset_relay_connections_accepted_total"] == accepted + 5
        # The cap, not the addresses: one of A's closing lets A in again.
        held.pop(0).close()
        probes = iter(a[5:])
        wait_for("a free place for /64 A", lambda: not closed_at_once(host, next(probes)))
    finally:
        for client in held:
            client.close()


def test_a_64_is_one_source_for_the_connection_rate(
    host: Host, key: bytes, sources: tuple[list[str], list[str]]
) -> None:
    configure(
        host,
        f"max_connections_per_ip = {UNLIMITED}\n"
        "new_connections_per_ip_per_second = 1\n"
        f"new_connections_per_ip_burst = {BURST}\n",
    )
    a, b = sources
    outcomes: list[bool] = []  # closed at once, for each fresh address of A in turn
    started = time.monotonic()
    for ip in a:
        outcomes.append(closed_at_once(host, ip))
        if outcomes[-1] and len(outcomes) > BURST + 2:
            break
    elapsed = time.monotonic() - started
    served = outcomes.count(False)
    assert outcomes[:BURST] == [False] * BURST, outcomes
    assert any(outcomes), f"{len(outcomes)} connections from /64 A in {elapsed:.1f} s, none refused"
    # One new connection a second on top of the burst (the bucket refills meanwhile).
    assert served <= BURST + int(elapsed) + 1, (outcomes, elapsed)
    wait_refused(host, "connection_rate", outcomes.count(True))
    # /64 B has a bucket of its own, full: its whole burst is served, the last handshaken.
    assert [closed_at_once(host, ip) for ip in b[: BURST - 1]] == [False] * (BURST - 1)
    client_from(host, key, b[BURST - 1]).close()
    wait_refused(host, "connection_rate", outcomes.count(True))


def test_refusals_from_a_64_ban_it_as_one_source(
    rig: Rig, host: Host, key: bytes, sources: tuple[list[str], list[str]]
) -> None:
    configure(
        host,
        "max_connections_per_ip = 2\n"
        f"new_connections_per_ip_per_second = {UNLIMITED}\n"
        f"new_connections_per_ip_burst = {UNLIMITED}\n",
        "enabled = true\nthreshold = 3\nwindow = 60\nban_time = 600\n",
    )
    a, b = sources
    network = str(rig.ipv6_subnets[0])
    cursor = journal_cursor(host)
    held = [client_from(host, key, ip) for ip in a[:2]]
    try:
        # One refusal from each of four addresses: only their /64 passes the threshold.
        assert [closed_at_once(host, ip) for ip in a[2:6]] == [True] * 4
        values = wait_refused(host, "max_connections_per_ip", 4)
        assert values["offset_relay_bans_active"] == 1
        assert values["offset_relay_bans_total"] == 1
    finally:
        for client in held:
            client.close()
    pid = unit(host, "MainPID")["MainPID"]
    lines = [line for line in journal_since(host, cursor, pid) if "banning" in line]
    assert len(lines) == 1, lines
    assert f"banning {network} for 600 s: 4 refusals in 60 s (ban 1)" in lines[0]
    # A fresh address of A is refused as banned, with A's connections gone; B is served.
    assert closed_at_once(host, a[6])
    wait_refused(host, "banned", 1)
    client_from(host, key, b[0]).close()
    values = wait_refused(host, "banned", 1)
    assert values["offset_relay_bans_active"] == 1


def test_a_ticket_with_an_ipv6_address_probes_ok_and_carries_a_tunnel(
    host: Host, key: bytes, tmp_path: Path
) -> None:
    configure(host, "")
    address = f"[{host.address6}]:{PORT}"
    made = host.ssh(
        f"t=$(mktemp -u) && stmgr relay-ticket --address '{address}' --idfile {IDENTITY} "
        "--allow-private --output $t && cat $t && rm $t"
    )
    assert made.stderr == ""
    ticket = tmp_path / "ipv6.relay"
    ticket.write_text(made.stdout)
    doc = json.loads(made.stdout)
    assert doc["address"] == address
    assert b64url_decode(doc["publicKey"], "publicKey") == key
    result = probe(ticket)
    assert result.returncode == 0, f"probe failed ({result.returncode}): {result.stderr.strip()}"
    assert result.stdout.startswith(f"OK relay {address}: handshake "), result.stdout
    # A tunnel through the ticket's address: listen, connect, accept, data both ways.
    relay = split_host_port(doc["address"])
    listener = RelayClient.open(relay, expected_key=key)
    connector = RelayClient.open(relay, expected_key=key)
    acceptor: RelayClient | None = None
    try:
        assert listener.sock.family == socket.AF_INET6
        assert listener.sock.getpeername()[0] == host.address6
        listener.listen()
        connector.connect(listener.public_key)
        assert listener.next_incoming() == connector.public_key
        acceptor = RelayClient.open(relay, listener.identity, expected_key=key)
        acceptor.accept(connector.public_key)
        there, back = b"over IPv6 " * 1000, b"and back " * 1000
        connector.send(there)
        acceptor.send(back)
        assert acceptor.receive() == there
        assert connector.receive() == back
    finally:
        for client in (listener, connector, acceptor):
            if client is not None:
                client.close()
